#!/usr/bin/env python
"""The 3D-parallel SFT trainer on megatron-core (not built yet).

It will read the packed files written by tools/preprocess_sft.py and train Qwen2.5 with tensor,
pipeline and data parallelism; until its issue lands, this entry point only says so.
"""

import sys

if __name__ == "__main__":
    sys.exit("pretrain_sft.py is not built yet: the data pipeline (tools/get_am_dataset.py, "
             "tools/preprocess_sft.py) is what runs today; see README.md")

#!/usr/bin/env python
"""Exports a megatron-core torch_dist checkpoint as a Hugging Face model of its family (the release).

    python tools/convert_mcore_to_hf.py --mcore runs/k2think --out release/K2-Think-SFT

--mcore is a converted checkpoint or a training run directory (its latest complete iter_NNNNNNN/, or
--iteration N), saved at any tensor/pipeline layout. Writes the family's weights (Qwen2ForCausalLM,
Qwen3ForCausalLM, LlamaForCausalLM) as safetensors shards of at most --max-shard-gb with
model.safetensors.index.json, config.json, generation_config.json, and the tokenizer with the chat
template the training data was encoded with (AM-thinking for the recipe) and its stop token
(<|im_end|>) as EOS. Streams tensors, so memory stays small whatever the model size;
the output appears under its final name only once complete. Exit status 2 with a message on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import exit_status
from common.logging_utils import setup_logging
from convert.hf_to_mcore import DTYPES
from convert.mcore_to_hf import DEFAULT_SHARD_BYTES, convert_mcore_to_hf
from formats.chat_template import TEMPLATES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mcore",
        type=Path,
        required=True,
        help="torch_dist checkpoint directory, or a training run directory of iter_NNNNNNN/ checkpoints",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="directory to create for the Hugging Face model"
    )
    parser.add_argument(
        "--iteration",
        type=int,
        default=None,
        help="which saved iteration of a run directory to export (default: the latest complete one)",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer directory (default: the tokenizer/ the checkpoint carries from its source)",
    )
    parser.add_argument(
        "--chat-template",
        choices=sorted(TEMPLATES),
        default=None,
        help="the chat template to install (default: the one the checkpoint's training data was encoded "
        "with, as the trainer recorded it; AM-thinking for a checkpoint that was never trained)",
    )
    parser.add_argument(
        "--enable-thinking",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="for a reasoning template (qwen3): whether prompts leave the model to think, the default of "
        "the template's enable_thinking variable (default: as the training data was encoded)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="dtype of the exported weights (default: the checkpoint's)",
    )
    parser.add_argument(
        "--max-shard-gb",
        type=float,
        default=DEFAULT_SHARD_BYTES / 1e9,
        help="largest safetensors shard in GB (default %(default)s, as transformers)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace --out if it exists (only once the new one is complete)"
    )
    return parser


def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    def export() -> int:
        convert_mcore_to_hf(
            args.mcore,
            args.out,
            iteration=args.iteration,
            tokenizer_dir=args.tokenizer,
            dtype=args.dtype,
            chat_template=args.chat_template,
            enable_thinking=args.enable_thinking,
            force=args.force,
            max_shard_bytes=int(args.max_shard_gb * 1e9),
        )
        return 0

    return exit_status(export)


if __name__ == "__main__":
    sys.exit(main())

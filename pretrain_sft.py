#!/usr/bin/env python
"""The K2-Think SFT trainer: Qwen2.5 on megatron-core with tensor, pipeline and data parallelism.

    python pretrain_sft.py --config configs/tiny_cpu.yaml                      # one process
    torchrun --nproc-per-node 8 pretrain_sft.py --config configs/k2think_qwen2.5_32b.yaml \\
        data.prefixes=[/data/am] model.init_checkpoint=/ckpt/qwen2.5-32b-mcore checkpoint.save_dir=/runs/k2

Overrides are `section.key=value` in YAML syntax (see sft/config.py for every key and its default).
The configuration is validated against the data, the checkpoint and the number of processes before
any process group or model is built. Checkpoints go to checkpoint.save_dir/iter_NNNNNNN; a run with
checkpoint.resume=auto (the default) continues from the latest complete one. SIGTERM or SIGUSR1 makes
the trainer save a checkpoint after the current iteration and stop. The logic lives in sft/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from common.cli import exit_status  # noqa: E402
from common.logging_utils import setup_logging  # noqa: E402
from sft.config import load_config  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", type=Path, help="YAML configuration (configs/); defaults to the recipe's values"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="configuration overrides such as parallel.tensor=8 or data.prefixes=[/data/am]",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    def body() -> int:
        from sft.trainer import NonFiniteLossError, run

        try:
            run(load_config(args.config, args.overrides))
        except NonFiniteLossError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0

    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())

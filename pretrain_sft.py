#!/usr/bin/env python
"""The K2-Think SFT trainer: Qwen2.5 (or Qwen3, Llama 3.x) on megatron-core, tensor x pipeline x context x
data parallel.

    python pretrain_sft.py --config configs/tiny_cpu.yaml                      # one process
    torchrun --nproc-per-node 8 pretrain_sft.py --config configs/k2think_qwen2.5_32b.yaml \\
        data.prefixes=[/data/am] model.init_checkpoint=/ckpt/qwen2.5-32b-mcore checkpoint.save_dir=/runs/k2

Overrides are `section.key=value` in YAML syntax (every key, its type, default and meaning: below).
The configuration is validated against the data, the checkpoint and the number of processes before
any process group or model is built. Checkpoints go to checkpoint.save_dir/iter_NNNNNNN; a run with
checkpoint.resume=auto (the default) continues from the latest complete one. SIGTERM or SIGUSR1 makes
the trainer save a checkpoint after the current iteration and stop. The logic lives in sft/.

Before booking the nodes, check that every rank fits (on a login node; sft/dry_run/):

    python pretrain_sft.py --config configs/k2think_qwen2.5_32b.yaml --dry-run --gpus 256
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from common.cli import exit_status
from common.config_docs import format_tree
from common.logging_utils import setup_logging
from sft.config import TrainConfig, describe_unset, dump_config, load_config, unset_variables


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="configuration keys (a YAML file of configs/ sets them, KEY=VALUE overrides them; "
        "${NAME} in a value is the environment variable NAME):\n\n" + format_tree(TrainConfig()),
    )
    parser.add_argument(
        "--config", type=Path, help="YAML configuration (configs/); defaults to the recipe's values"
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration (YAML, after the file, the overrides and the environment "
        "variables; one that is not set stays ${NAME}, with a note on stderr) and exit",
    )
    dry = parser.add_argument_group(
        "dry run", "each rank's GPU memory, measured on this machine (a CPU) before the job starts"
    )
    dry.add_argument(
        "--dry-run",
        action="store_true",
        help="build the first and the last pipeline stage's rank of the job on fake tensors, run two "
        "iterations, print each one's peak memory by part beside the planner's estimate, and exit "
        "(1 when a rank would not fit); no GPU, data or weights are needed: only the model's shape "
        "(model.init_checkpoint: a converted checkpoint, an HF model directory or its config.json)",
    )
    dry.add_argument(
        "--gpus",
        type=int,
        help="with --dry-run: the job's number of GPUs (data parallelism follows from it and the layout)",
    )
    dry.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=80.0,
        help="with --dry-run: each GPU's memory (default 80, an H100); a fixed allowance for the CUDA "
        "context, NCCL and fragmentation is kept free of it",
    )
    dry.add_argument("--dry-run-json", type=Path, help="with --dry-run: also write the report to this file")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="configuration overrides such as parallel.tensor=8 or data.prefixes=[/data/am]",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    setup_logging()

    if not args.dry_run and (args.gpus is not None or args.dry_run_json is not None):
        print("error: --gpus and --dry-run-json apply to --dry-run only", file=sys.stderr)
        return 2

    def body() -> int:
        if args.print_config:
            config = load_config(args.config, args.overrides, allow_unset=True)
            print(dump_config(config), end="")
            unset = unset_variables(config)
            if unset:
                print(
                    f"note: not set, shown as ${{NAME}}: {describe_unset(unset)}; a run needs them exported "
                    "or the keys overridden",
                    file=sys.stderr,
                )
            return 0
        if args.dry_run:
            from sft.dry_run import run_dry_run

            if args.gpus is None:
                print("error: --dry-run needs --gpus N, the job's number of GPUs", file=sys.stderr)
                return 2
            config = load_config(args.config, args.overrides, allow_unset=True)
            return run_dry_run(config, args.gpus, args.gpu_memory_gb, args.dry_run_json)
        config = load_config(args.config, args.overrides)
        config.check_files(int(os.environ.get("WORLD_SIZE", "1")))  # before torch and megatron-core load
        from sft.callbacks import NonFiniteLossError
        from sft.launch import run

        try:
            run(config)
        except NonFiniteLossError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0

    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())

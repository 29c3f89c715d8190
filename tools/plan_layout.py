#!/usr/bin/env python
"""Prints the feasible parallel layouts of a model (Qwen2/2.5, Qwen3, Qwen3 MoE with expert parallelism,
Llama 3.x) for a sequence length,
global batch and GPU count, with memory per GPU (weights, gradients, optimizer shards, activations,
logits, other, buffers) and an estimated step time and MFU, fastest first; recommends the first. The
model behind the figures is documented in plan/planner.py; layouts are checked by the trainer's own
rules (plan/layout.py).

    python tools/plan_layout.py --model /models/Qwen2.5-32B/config.json --seq-length 32768 \\
        --global-batch 512 --gpus 256 --gpu-memory-gb 80
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.cli import exit_status
from common.devices import ACCELERATORS, RECIPE_ACCELERATOR
from common.errors import InputError
from plan.planner import BUFFER_ALLOWANCE_GB, HEADROOM


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model",
        type=Path,
        help="HF config.json, a model directory holding one, or a converted checkpoint (hf_config.json)",
    )
    source.add_argument(
        "--config",
        type=Path,
        help="a trainer YAML config: the model comes from its model.init_checkpoint, and the sequence "
        "length and global batch from it unless given",
    )
    parser.add_argument(
        "--seq-length", type=int, help="packed sequence length (default 32768, or the config's)"
    )
    parser.add_argument(
        "--global-batch", type=int, help="packs per optimizer step (default 512, or the config's)"
    )
    parser.add_argument("--gpus", type=int, default=256, help="number of GPUs (default 256 = 32 nodes x 8)")
    parser.add_argument(
        "--gpu",
        choices=[a.name for a in ACCELERATORS],
        default=RECIPE_ACCELERATOR.name,
        help=f"the GPU, for its datasheet memory and dense bf16 peak (default {RECIPE_ACCELERATOR.name}, "
        "the recipe's); --gpu-memory-gb and --peak-tflops override either",
    )
    parser.add_argument("--gpu-memory-gb", type=float, help="memory per GPU in GB (default: the --gpu's)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak per GPU (default: the --gpu's)")
    parser.add_argument(
        "--efficiency", type=float, default=0.6, help="fraction of peak the GEMMs reach (default 0.6)"
    )
    parser.add_argument(
        "--packing-fill",
        type=float,
        default=1.0,
        help="fraction of packed-row tokens that are real, not padding (default 1.0; "
        "stats.packing_efficiency in PREFIX_meta.json): padding costs compute but counts as no model FLOPs",
    )
    parser.add_argument(
        "--mean-conversation",
        type=float,
        default=4000.0,
        help="mean conversation length in tokens, for attention FLOPs (default 4000; see PREFIX_meta.json)",
    )
    parser.add_argument(
        "--buffer-gb",
        type=float,
        default=sum(BUFFER_ALLOWANCE_GB.values()),
        help="memory kept free for what tensors do not account for: "
        + ", ".join(f"{name} {gb:g}" for name, gb in BUFFER_ALLOWANCE_GB.items())
        + " GB by default",
    )
    parser.add_argument(
        "--no-te",
        action="store_true",
        help="Transformer Engine absent: the torch layers and the all-gather context-parallel attention",
    )
    parser.add_argument("--top", type=int, default=15, help="layouts to print (default 15)")
    parser.add_argument("--json", type=Path, help="also write every estimate to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from models.hf_config import find_hf_config
        from models.registry import read_arch
        from plan.planner import Hardware, format_stages, format_table, plan, recommend, recompute_overrides

        seq_length, global_batch = args.seq_length or 32768, args.global_batch or 512
        path = args.model
        if args.config is not None:
            from sft.config import load_config

            config = load_config(args.config)
            if config.model.init_checkpoint is None:
                raise InputError(f"{args.config}: model.init_checkpoint is not set; pass --model instead")
            path = Path(config.model.init_checkpoint)
            seq_length = args.seq_length or config.data.seq_length
            global_batch = args.global_batch or config.schedule.global_batch_size
        arch = read_arch(path)
        gpu = next(a for a in ACCELERATORS if a.name == args.gpu)
        hw = Hardware(
            gpus=args.gpus,
            gpu_memory_gb=args.gpu_memory_gb or gpu.memory_gb,
            peak_tflops=args.peak_tflops or gpu.bf16_dense_tflops,
            efficiency=args.efficiency,
            buffer_gb=args.buffer_gb,
        )
        estimates = plan(
            arch,
            hw,
            seq_length,
            global_batch,
            args.mean_conversation,
            te_available=not args.no_te,
            fill=args.packing_fill,
        )
        print(
            f"{find_hf_config(path)}: {arch.num_layers} layers, hidden {arch.hidden_size}; seq {seq_length}, "
            f"global batch {global_batch}, {args.gpus} GPUs x {hw.gpu_memory_gb:g} GB "
            f"({gpu.name}, {hw.peak_tflops:g} TFLOP/s dense bf16)\n"
        )
        print(format_table(estimates, args.top))
        feasible = [e for e in estimates if e.fits]
        if not feasible:
            print("\nno layout fits: add GPUs, lower the sequence length, or raise --gpu-memory-gb")
            return 1
        best = recommend(feasible)
        layout = best.layout
        print(
            f"\nrecommended: parallel.tensor={layout.tensor} parallel.pipeline={layout.pipeline} "
            f"parallel.virtual_pipeline={layout.virtual_pipeline or 'null'} "
            f"parallel.context={layout.context} "
            f"parallel.sequence_parallel={str(layout.sequence_parallel).lower()} "
            f"{recompute_overrides(best.recompute, arch)} "
            f"parallel.micro_batch_size={layout.micro_batch_size}"
            + (
                f" parallel.expert={layout.expert} parallel.expert_tensor={layout.expert_tensor_size}"
                if arch.moe
                else ""
            )
        )
        print(format_stages(best))
        fastest = feasible[0]
        if fastest.step_time_s < best.step_time_s * 0.99:
            lay, gain = fastest.layout, 100 * (1 - fastest.step_time_s / best.step_time_s)
            print(
                f"  (faster on paper, by {gain:.1f}%: TP {lay.tensor} "
                f"PP {lay.pipeline} VP {lay.virtual_stages} CP {lay.context} {fastest.recompute}, at "
                f"{fastest.total_gb:.1f} GB of {hw.gpu_memory_gb:g}: it leaves less than "
                f"{HEADROOM:.0%} of the memory "
                "free, and the allocator's fragmentation at these shapes is unmeasured)"
            )
        if args.json:
            args.json.write_text(json.dumps([e.to_dict() for e in estimates], indent=1))
        return 0

    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())

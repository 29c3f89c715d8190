#!/usr/bin/env python
"""Verifies a conversion: Hugging Face and megatron-core logits on the same tokens, in fp32.

    python tools/verify_conversion.py --hf /models/Qwen2.5-32B --mcore ckpt/qwen2.5-32b-mcore --tp 8

Runs the family's transformers class (Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM,
LlamaForCausalLM) from --hf and megatron-core's GPTModel from the torch_dist checkpoint --mcore at --tp x
--pp processes, a mixture of experts also at --ep x --etp (gloo on CPU, or one GPU each when CUDA is
available), on seeded random token sequences, and prints the max and
mean absolute logit difference, the top-1 agreement and a PASS/FAIL verdict against --atol (exit status
0 or 1).

Memory: both models are held in fp32 (4 bytes per parameter each; the HF one in this process).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import exit_status
from common.logging_utils import setup_logging
from convert.verify import verify_conversion


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--hf", type=Path, required=True, help="the Hugging Face model directory (the reference)"
    )
    parser.add_argument(
        "--mcore", type=Path, required=True, help="the torch_dist checkpoint (or run directory) to check"
    )
    parser.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel size to load the checkpoint at (default 1)"
    )
    parser.add_argument(
        "--pp", type=int, default=1, help="pipeline-parallel size to load the checkpoint at (default 1)"
    )
    parser.add_argument(
        "--ep", type=int, default=1, help="a mixture of experts: expert-parallel size (default 1)"
    )
    parser.add_argument(
        "--etp",
        type=int,
        default=None,
        help="a mixture of experts: expert-tensor-parallel size (default --tp)",
    )
    parser.add_argument(
        "--moe-dispatcher",
        choices=("alltoall", "allgather"),
        default="alltoall",
        help="a mixture of experts: megatron-core's token dispatcher (default alltoall)",
    )
    parser.add_argument("--batch", type=int, default=2, help="number of token sequences (default 2)")
    parser.add_argument("--seq-length", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default 0)")
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="largest accepted absolute logit difference (default 1e-4); deep models in fp32 "
        "accumulate summation-order differences, so judge a near miss by the mean and top-1",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where both models run (default: cuda when available, else cpu)",
    )
    return parser


def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    def verify() -> int:
        result = verify_conversion(
            args.hf,
            args.mcore,
            tensor_parallel=args.tp,
            pipeline_parallel=args.pp,
            expert_parallel=args.ep,
            expert_tensor_parallel=args.etp,
            moe_dispatcher=args.moe_dispatcher,
            batch=args.batch,
            seq_length=args.seq_length,
            seed=args.seed,
            atol=args.atol,
            device=args.device,
        )
        experts = f" EP={args.ep} ETP={args.etp or args.tp}" if args.ep > 1 or args.etp else ""
        print(
            f"TP={args.tp} PP={args.pp}{experts}, {args.batch} x {args.seq_length} tokens: {result.summary()}"
        )
        return 0 if result.passed else 1

    return exit_status(verify)


if __name__ == "__main__":
    sys.exit(main())

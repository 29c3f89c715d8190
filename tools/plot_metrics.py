#!/usr/bin/env python
"""Plots a training run's curves from its metrics.jsonl: loss and validation loss, learning rate,
gradient norm, tokens/s, MFU and step time against iterations, in one PNG.

    python tools/plot_metrics.py runs/k2think                 # -> runs/k2think/metrics.png
    python tools/plot_metrics.py runs/k2think --out curves.png

Works on a finished run and on one still training (it reads what has been logged so far).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import exit_status
from common.logging_utils import setup_logging
from sft.plots import plot_metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "run", type=Path, help="the run directory (checkpoint.save_dir) or a metrics.jsonl file"
    )
    parser.add_argument("--out", type=Path, help="the PNG to write (default: RUN/metrics.png)")
    parser.add_argument("--title", help="the figure's title (default: the run directory)")
    return parser


def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    metrics = args.run / "metrics.jsonl" if args.run.is_dir() else args.run

    def body() -> int:
        out = plot_metrics(metrics, args.out or metrics.with_name("metrics.png"), args.title)
        print(f"wrote {out}")
        return 0

    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())

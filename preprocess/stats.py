"""Summaries of a preprocessing run: the conversation-length distribution as text and as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_PERCENTILES = (1, 10, 25, 50, 75, 90, 99, 99.9)


def length_summary(lengths: np.ndarray) -> dict[str, Any]:
    if len(lengths) == 0:
        return {"count": 0}
    values = np.percentile(lengths, _PERCENTILES, method="lower")
    return {
        "count": int(len(lengths)),
        "mean": round(float(lengths.mean()), 2),
        "min": int(lengths.min()),
        "max": int(lengths.max()),
        "percentiles": {f"p{p:g}": int(v) for p, v in zip(_PERCENTILES, values, strict=True)},
    }


def log2_histogram(lengths: np.ndarray, upper: int) -> list[tuple[int, int, int]]:
    """(low, high, count) over power-of-two length bins up to `upper`."""
    edges = [1]
    while edges[-1] < upper:
        edges.append(min(edges[-1] * 2, upper))
    edges[-1] = upper + 1
    counts, _ = np.histogram(lengths, bins=edges)
    return [(lo, hi - 1, int(c)) for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True) if c]


def format_histogram(rows: list, width: int = 40) -> str:
    """Text bars for `log2_histogram` rows."""
    if not rows:
        return "(no conversations)"
    peak = max(c for _, _, c in rows)
    return "\n".join(
        f"  {lo:>6}-{hi:<6} {c:>9} {'#' * max(1, round(width * c / peak))}" for lo, hi, c in rows
    )


def save_histogram_png(lengths: np.ndarray, upper: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    bins = np.unique(np.geomspace(1, upper + 1, 60).astype(int))
    ax.hist(lengths, bins=bins, color="#3b6ea8")
    ax.set_xscale("log")
    if len(lengths):
        ax.set_xlim(max(1.0, lengths.min() / 1.5), upper * 1.5)
    ax.set_xlabel("tokens per conversation (after truncation)")
    ax.set_ylabel("conversations")
    ax.set_title(title)
    if len(lengths):
        ax.axvline(
            float(np.median(lengths)),
            color="#c0392b",
            linestyle="--",
            label=f"median {int(np.median(lengths))}",
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)

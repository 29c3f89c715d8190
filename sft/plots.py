"""Training curves at a glance: metrics.jsonl -> one PNG (loss and validation loss, learning rate,
gradient norm, throughput, MFU, step time against iterations).

    plot_metrics("runs/k2think/metrics.jsonl", "runs/k2think/metrics.png")

The trainer writes SAVE_DIR/metrics.png this way at the end of a run (logging.plot);
tools/plot_metrics.py does it for any run directory, also while the run is going.
"""

from __future__ import annotations

from pathlib import Path

from common.errors import InputError
from common.files import atomic_output

from .metrics import read_metrics

# (metric key, panel title, scale factor for display)
_PANELS = (
    ("lr", "learning rate", 1.0),
    ("grad_norm", "gradient norm (before clipping)", 1.0),
    ("tokens_per_s", "tokens / s (all GPUs)", 1.0),
    ("mfu", "MFU (%)", 100.0),
    ("step_time_s", "step time (s)", 1.0),
)


def plot_metrics(metrics_file: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """Draws the run's curves into `out_png` (written atomically); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_file = Path(metrics_file)
    if not metrics_file.is_file():
        raise InputError(
            f"{metrics_file} not found: pass a run directory (checkpoint.save_dir) or its metrics.jsonl"
        )
    train, valid = read_metrics(metrics_file)
    if not train:
        raise InputError(f"{metrics_file} holds no training iteration yet")
    steps = [r["iteration"] for r in train]
    figure, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    loss_axis = axes[0][0]
    loss_axis.plot(steps, [r["loss"] for r in train], label="training loss", linewidth=1)
    if valid:
        loss_axis.plot(
            [r["iteration"] for r in valid], [r["val_loss"] for r in valid], "o-", label="validation loss"
        )
    skipped = [r for r in train if r.get("step_skipped")]
    if skipped:
        loss_axis.plot(
            [r["iteration"] for r in skipped], [r["loss"] for r in skipped], "rx", label="skipped step"
        )
    loss_axis.set_title("loss (per trained token)")
    loss_axis.legend()
    for axis, (key, name, scale) in zip(axes.flat[1:], _PANELS, strict=True):
        axis.plot(steps, [r.get(key, float("nan")) * scale for r in train], linewidth=1)
        axis.set_title(name)
    for axis in axes.flat:
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
    figure.suptitle(title or str(metrics_file.parent))
    out_png = Path(out_png)
    with atomic_output(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)
    return out_png

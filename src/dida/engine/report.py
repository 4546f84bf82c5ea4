"""Human-readable evaluation output: the per-class table and the per-class IoU bar chart.

matplotlib (the ``viz`` extra) is imported only inside ``plot_class_iou``, and through its object API
with the Agg canvas, so the global pyplot backend of the calling process is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dida.constants import PALETTE

__all__ = ["format_metrics_table", "plot_class_iou"]


def _pct(x: float) -> str:
    return "  nan" if x is None or math.isnan(float(x)) else f"{100 * float(x):.2f}"


def format_metrics_table(metrics: dict[str, Any], names: Sequence[str], *, synthia: bool = False) -> str:
    """The mmseg-style table: one row per class (IoU, Acc in %), then aAcc / mIoU / mAcc (+16/13).

    Args:
        metrics: output of ``MetricAccumulator.compute`` (fractions).
        names: class names, ``len == C``.
        synthia: also print mIoU16 and mIoU13 (SYNTHIA protocol).
    """
    width = max(12, *(len(n) for n in names))
    lines = [f"{'class':<{width}} | {'IoU':>6} | {'Acc':>6}", f"{'-' * width}-+-{'-' * 6}-+-{'-' * 6}"]
    for i, name in enumerate(names):
        lines.append(f"{name:<{width}} | {_pct(metrics['IoU'][i]):>6} | {_pct(metrics['Acc'][i]):>6}")
    lines.append(f"{'-' * width}-+-{'-' * 6}-+-{'-' * 6}")
    summary = [("aAcc", metrics["aAcc"]), ("mIoU", metrics["mIoU"]), ("mAcc", metrics["mAcc"])]
    if synthia:
        summary += [("mIoU16", metrics["mIoU16"]), ("mIoU13", metrics["mIoU13"])]
    lines.append("  ".join(f"{k}: {_pct(v)}" for k, v in summary))
    if "num_images" in metrics:
        extra = f"{metrics['num_images']} images"
        if "images_per_s" in metrics and not math.isnan(metrics["images_per_s"]):
            extra += f", {metrics['images_per_s']:.2f} images/s"
        lines.append(extra)
    return "\n".join(lines)


def plot_class_iou(
    iou: Sequence[float] | np.ndarray,
    names: Sequence[str],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Save a bar chart of per-class IoU (in %, palette colours; NaN classes marked "n/a").

    Args:
        iou: ``[C]`` fractions, NaN allowed.
        names: ``[C]`` class names.
        path: output PNG (written atomically).

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from dida.io import atomic_path

    values = np.asarray(iou, dtype=np.float64) * 100.0
    n = len(names)
    colours = [tuple(c / 255.0 for c in PALETTE[i % len(PALETTE)]) for i in range(n)]
    fig = Figure(figsize=(max(6.0, 0.45 * n + 2.0), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    shown = np.nan_to_num(values, nan=0.0)
    bars = ax.bar(range(n), shown, color=colours, edgecolor="black", linewidth=0.5)
    for bar, v in zip(bars, values):
        label = "n/a" if math.isnan(v) else f"{v:.1f}"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
    finite = values[~np.isnan(values)]
    caption = "dashed line: mIoU (nan-mean)"
    if finite.size:
        ax.axhline(float(finite.mean()), color="gray", linestyle="--", linewidth=1)
        caption = f"dashed line: mIoU {finite.mean():.2f} (nan-mean)"
    ax.set_xticks(range(n))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 108)
    ax.set_title(f"{title}\n{caption}" if title else caption, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path

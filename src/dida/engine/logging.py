"""Metric writers (terminal with ETA, ``metrics.jsonl``, TensorBoard when installed) and debug images."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if v == 0 or math.isnan(v) or 1e-3 <= abs(v) < 1e4:
        return f"{v:.4f}"
    return f"{v:.3e}"


class MetricWriter:
    """The run's record, in the convention of mmseg / detectron2 logs.

    - ``metrics.jsonl``: one JSON object per logged iteration (losses, statistics, learning rate, timing,
      peak memory); ``eval.jsonl``: one per evaluation;
    - ``train.log``: the human-readable log (banner, one line per logged iteration with s/iter, data time,
      ETA and peak memory, the per-class table of each evaluation, the final summary), also printed;
    - TensorBoard scalars when TensorBoard is installed.
    """

    def __init__(self, run_dir: Path, *, max_iters: int, start_iter: int = 0, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.max_iters = max_iters
        self.stream = stream or sys.stdout
        self._t0 = time.perf_counter()
        self._it0 = start_iter
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1) if enabled else None
        self._text = open(run_dir / "train.log", "a", buffering=1) if enabled else None
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tb"))
            except Exception:
                self._tb = None

    def line(self, text: str, *, stream: TextIO | None = None) -> None:
        """Print ``text`` and append it to ``train.log`` (with a time stamp per line)."""
        if not self.enabled:
            return
        print(text, file=stream or self.stream, flush=True)
        assert self._text is not None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for row in text.splitlines() or [""]:
            self._text.write(f"{stamp} {row}\n")

    def log(self, it: int, values: dict[str, float], *, timing: dict[str, float] | None = None) -> None:
        """Record the values of (1-based) iteration ``it``.

        Args:
            values: losses, statistics and the learning rate (averaged over the logging interval).
            timing: ``time/iter`` and ``time/data`` (seconds, interval means) and ``mem/peak_gib``.
        """
        if not self.enabled:
            return
        timing = timing or {}
        elapsed = time.perf_counter() - self._t0
        done = max(it - self._it0, 1)
        per_iter = timing.get("time/iter", elapsed / done)
        eta = per_iter * max(self.max_iters - it, 0)
        record = {"iter": it, **values, **{k: round(v, 4) for k, v in timing.items()}, "time": round(elapsed, 3)}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        body = "  ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        extra = ""
        if "time/iter" in timing:
            extra += f"  time={timing['time/iter']:.3f}s/it data={timing.get('time/data', 0.0):.3f}s"
        if "mem/peak_gib" in timing:
            extra += f"  mem={timing['mem/peak_gib']:.2f}GiB"
        self.line(f"[iter {it}/{self.max_iters}] {body}{extra}  eta={_format_seconds(eta)}")
        if self._tb is not None:
            for k, v in {**values, **timing}.items():
                self._tb.add_scalar(k, v, it)

    def log_eval(self, it: int, metrics: dict[str, Any], run_dir: Path, class_names: list[str]) -> None:
        """Append to ``eval.jsonl`` and write the per-class table."""
        if not self.enabled:
            return
        from dida.engine.report import format_metrics_table

        iou = [None if np.isnan(x) else float(x) for x in np.asarray(metrics["IoU"], dtype=float)]
        record = {"iter": it, "mIoU": float(metrics["mIoU"]), "aAcc": float(metrics["aAcc"]),
                  "IoU": dict(zip(class_names, iou))}
        with open(run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.line(f"[iter {it}] evaluation on {metrics.get('num_images', '?')} images:\n"
                  + format_metrics_table(metrics, class_names))
        self.line(f"[iter {it}] eval mIoU={100 * record['mIoU']:.2f} aAcc={100 * record['aAcc']:.2f}")
        if self._tb is not None:
            self._tb.add_scalar("eval/mIoU", record["mIoU"], it)

    def close(self) -> None:
        for name in ("_jsonl", "_text"):
            f = getattr(self, name)
            if f is not None:
                f.close()
                setattr(self, name, None)
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def peak_memory_gib(device: Any) -> float:
    """Peak memory so far: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS elsewhere."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _format_seconds(s: float) -> str:
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


class DebugVisualizer:
    """Writes the step's debug tensors (images, labels, weights, masks) as one PNG grid per iteration.

    Images are denormalised with the ImageNet mean/std; label maps use the Cityscapes palette; weight
    and mask maps are shown in grey levels. Rows: batch elements; columns: the debug entries.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def __call__(self, it: int, debug: dict[str, Any]) -> Path:
        import cv2
        import torch

        from dida.constants import IMG_MEAN, IMG_STD
        from dida.io import write_png
        from dida.visualize import palette_lut

        palette = palette_lut()
        rows: list[np.ndarray] = []
        names = list(debug)
        batch = next(iter(debug.values())).shape[0]
        for b in range(batch):
            tiles = []
            for name in names:
                t = debug[name][b].detach().float().cpu()
                if t.dim() == 3 and t.shape[0] == 3:  # normalised RGB image
                    img = t.permute(1, 2, 0).numpy() * np.asarray(IMG_STD) + np.asarray(IMG_MEAN)
                    tile = np.clip(img, 0, 255).astype(np.uint8)
                else:
                    t = t.squeeze(0) if t.dim() == 3 else t
                    if torch.is_floating_point(debug[name]):
                        tile = np.repeat((np.clip(t.numpy(), 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)
                    else:
                        tile = palette[t.numpy().astype(np.int64).clip(0, 255)]
                h = max(160, tile.shape[0])  # small crops are enlarged to stay readable
                tile = cv2.resize(np.ascontiguousarray(tile), (tile.shape[1] * h // tile.shape[0], h),
                                  interpolation=cv2.INTER_NEAREST)
                cv2.putText(tile, name, (3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
                tiles.append(tile)
            rows.append(np.concatenate(tiles, axis=1))
        w = max(r.shape[1] for r in rows)
        grid = np.concatenate([np.pad(r, ((0, 0), (0, w - r.shape[1]), (0, 0))) for r in rows], axis=0)
        path = self.out_dir / f"{it:06d}.png"
        write_png(path, np.ascontiguousarray(grid[..., ::-1]))
        return path

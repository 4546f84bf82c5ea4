"""Semantic-segmentation metrics (mmseg 0.16 semantics), the evaluation loop and prediction export.

The ``dida test`` command that drives them is ``dida.commands.test``.

Metric definition (spec 8, ``mmseg.core.evaluation.eval_metrics``): for every image the pixels whose
ground truth equals ``ignore_index`` are dropped; intersection, prediction and label areas are counted
per class and **accumulated over the whole split**; then

    IoU_c = I_c / (P_c + L_c - I_c)     (NaN when 0 / 0: the class is absent from prediction and GT)
    Acc_c = I_c / L_c                   (NaN when the class has no GT pixel)
    aAcc  = sum_c I_c / sum_c L_c
    mIoU  = nanmean_c IoU_c

The counts live in one on-device confusion matrix. ``update`` never synchronises with the host (a
``scatter_add_``: ``torch.bincount`` on CUDA reads the maximum back to size its output). Values outside
``[0, num_classes)`` that are not ``ignore_index`` go to an extra "other" row/column so that they count
exactly as mmseg's ``torch.histc`` counts them (a prediction pixel on an out-of-range label still adds to
the predicted area of its class, but to no label area).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dida.constants import IGNORE_INDEX, NUM_CLASSES, SYNTHIA_13_CLASSES, SYNTHIA_16_CLASSES
from dida.errors import DataError
from dida.io import write_png
from dida.runtime import autocast
from dida.visualize import palette_lut

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "MetricAccumulator",
    "PredictionWriter",
    "evaluate",
    "segmentation_metrics",
    "trainid_to_labelid_lut",
]

# ----------------------------------------------------------------------------------------- metrics


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (without a warning) when there is none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        # Labels decoded by PIL are read-only views; torch wants writable memory.
        return torch.from_numpy(x if x.flags.writeable else x.copy())
    return torch.as_tensor(x)


class MetricAccumulator:
    """Accumulates a ``(C+1) x (C+1)`` confusion matrix over a split, on ``device``.

    Row = ground truth, column = prediction; index ``C`` collects out-of-range values (never
    ``ignore_index``, whose pixels are dropped). Counts are int64 (exact; the reference accumulates
    float64, which is exact for any realistic split too).

    Args:
        num_classes: number of classes C.
        ignore_index: ground-truth value whose pixels are excluded.
        device: where the counts live (the device of the predictions, so updates stay on it).
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        ignore_index: int = IGNORE_INDEX,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.device = torch.device(device)
        # (C+1)^2 cells plus one trash bin for ignored pixels (lets update avoid boolean indexing).
        self._counts = torch.zeros((num_classes + 1) ** 2 + 1, dtype=torch.int64, device=self.device)
        self.num_images = 0

    def reset(self) -> None:
        self._counts.zero_()
        self.num_images = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray) -> None:
        """Add one image (``[H, W]``) or a batch (``[B, H, W]``) of predictions and labels.

        Args:
            pred: predicted class ids, any integer dtype; same shape as ``label``.
            label: ground-truth class ids, ``ignore_index`` allowed.
        """
        pred_t = _as_tensor(pred).to(self.device, non_blocking=True)
        label_t = _as_tensor(label).to(self.device, non_blocking=True)
        if pred_t.shape != label_t.shape:
            raise ValueError(
                f"prediction shape {tuple(pred_t.shape)} differs from label shape {tuple(label_t.shape)}"
            )
        n = self.num_classes
        p = pred_t.reshape(-1).long()
        g = label_t.reshape(-1).long()
        p = torch.where((p >= 0) & (p < n), p, n)
        g_bin = torch.where((g >= 0) & (g < n), g, n)
        index = torch.where(g == self.ignore_index, (n + 1) ** 2, g_bin * (n + 1) + p)
        self._counts.scatter_add_(0, index, torch.ones_like(index))
        self.num_images += 1 if pred_t.dim() <= 2 else pred_t.shape[0]

    def merge(self, other: MetricAccumulator) -> None:
        """Add the counts of another accumulator with the same class count."""
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge accumulators with different class counts")
        self._counts += other._counts.to(self.device)
        self.num_images += other.num_images

    def all_reduce(self) -> None:
        """Sum the counts over all processes (no-op unless torch.distributed is initialised)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        dist.all_reduce(self._counts)
        n = torch.tensor([self.num_images], dtype=torch.int64, device=self.device)
        dist.all_reduce(n)
        self.num_images = int(n.item())

    @property
    def confusion_matrix(self) -> torch.Tensor:
        """``[C, C]`` int64 counts (rows = ground truth, columns = prediction), on ``device``."""
        n = self.num_classes
        return self._counts[:-1].view(n + 1, n + 1)[:n, :n]

    def compute(self) -> dict[str, Any]:
        """Return the metrics of everything seen so far.

        Returns:
            dict with ``aAcc`` (float), ``mIoU``, ``mAcc``, ``mIoU16``, ``mIoU13`` (floats; the last two
            are NaN unless C == 19), ``IoU``, ``Acc``, ``area_intersect``, ``area_union``,
            ``area_pred``, ``area_label`` (float64 arrays ``[C]``, NaN allowed), ``num_images``,
            ``num_pixels`` (evaluated, non-ignored), ``out_of_range_label_pixels``.
        """
        n = self.num_classes
        full = self._counts[:-1].view(n + 1, n + 1).cpu().numpy().astype(np.float64)
        inter = np.diag(full[:n, :n]).copy()
        area_pred = full[:, :n].sum(axis=0)
        area_label = full[:n, :].sum(axis=1)
        union = area_pred + area_label - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / union
            acc = inter / area_label
            a_acc = float(inter.sum() / area_label.sum()) if area_label.sum() > 0 else float("nan")
        result: dict[str, Any] = {
            "aAcc": a_acc,
            "mIoU": _nanmean(iou),
            "mAcc": _nanmean(acc),
            "mIoU16": _nanmean(iou[list(SYNTHIA_16_CLASSES)]) if n == NUM_CLASSES else float("nan"),
            "mIoU13": _nanmean(iou[list(SYNTHIA_13_CLASSES)]) if n == NUM_CLASSES else float("nan"),
            "IoU": iou,
            "Acc": acc,
            "area_intersect": inter,
            "area_union": union,
            "area_pred": area_pred,
            "area_label": area_label,
            "num_images": self.num_images,
            "num_pixels": int(full.sum()),
            "out_of_range_label_pixels": int(full[n, :].sum()),
        }
        return result


def segmentation_metrics(
    preds: Sequence[torch.Tensor | np.ndarray],
    labels: Sequence[torch.Tensor | np.ndarray],
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Any]:
    """mmseg-0.16 metrics of label maps accumulated over a list of images (see ``MetricAccumulator``).

    Args:
        preds: predicted label maps, each ``[H_i, W_i]`` (numpy or torch, integer).
        labels: ground-truth label maps with the same shapes, ``ignore_index`` allowed.

    Returns:
        ``MetricAccumulator.compute()``: ``aAcc``, ``IoU``/``Acc`` (float64 ``[C]``, NaN for absent
        classes), ``mIoU``, ``mIoU16``, ``mIoU13`` (nan-means), and the raw areas.
    """
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    acc = MetricAccumulator(num_classes, ignore_index, device="cpu")
    for p, g in zip(preds, labels):
        acc.update(p, g)
    return acc.compute()


# ------------------------------------------------------------------------------------ evaluation


def _collate_item(item: dict[str, Any]) -> dict[str, Any]:
    """DataLoader ``collate_fn`` for ``batch_size=None``: arrays -> tensors, everything else as is."""
    if item.get("label") is None:
        raise DataError(f"{item.get('filename')}: this image has no label; evaluation needs labelled data.")
    return {**item, "img": _as_tensor(item["img"]), "label": _as_tensor(item["label"])}


def _item_to_device(item: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return item["img"].to(device, non_blocking=True), item["label"].to(device, non_blocking=True)


def evaluate(
    model: nn.Module,
    dataset: Any,
    *,
    device: str | torch.device,
    mode: str = "whole",
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    batched_slide: bool = False,
    amp: str = "off",
    num_classes: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    progress: bool = True,
    max_images: int | None = None,
    on_prediction: Callable[[int, dict[str, Any], torch.Tensor], None] | None = None,
    num_workers: int = 0,
    distributed: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on a validation dataset with the reference inference (spec 8).

    Each item (``dida.data.uda.ValDataset``) gives ``img`` (test pipeline, ``[3, h, w]``) and
    ``label`` (``[H, W]`` at original resolution). The logits are resized to ``h x w`` and then to
    ``H x W`` before softmax + argmax (``dida.models.inference``). The model is put in eval mode and
    its previous mode restored. With ``distributed=True`` under an initialised torch.distributed, every
    rank must call this: each takes every world_size-th image and the counts are summed over ranks.

    Args:
        model: a ``Segmentor``.
        dataset: indexable, ``len``-able, items as above.
        device: where inference and counting run.
        mode: "whole" or "slide"; ``crop_size``/``stride`` (h, w) for "slide".
        batched_slide: "slide" with all windows of an image in one batch (``eval.batched_slide``; HRDA's
            test configuration, hrda_mic.md 1.7).
        amp: "off", "bf16" or "fp16" (torch.autocast).
        num_classes: defaults to ``model.num_classes``.
        progress: show a tqdm bar (images/s).
        max_images: evaluate only the first N images.
        on_prediction: called as ``fn(index, item, pred)`` with ``pred`` ``[H, W]`` int64 on ``device``.
        num_workers: DataLoader workers for decoding/resizing.
        distributed: shard the images over the ranks and all-reduce the counts (default: this process
            evaluates everything alone, e.g. rank 0 only).

    Returns:
        ``MetricAccumulator.compute()`` plus ``seconds`` and ``images_per_s``.
    """
    device = torch.device(device)
    n_classes = int(num_classes if num_classes is not None else model.num_classes)
    total = len(dataset) if max_images is None else min(len(dataset), max_images)
    if total == 0:
        raise DataError("the validation set is empty: nothing to evaluate.")
    indices, rank, sharded = _shard(total, distributed)
    loader = _loader(dataset, indices, device, num_workers)
    acc = MetricAccumulator(n_classes, ignore_index, device=device)
    bar = _progress_bar(len(indices)) if progress and rank == 0 else None
    start = time.perf_counter()
    try:
        _predict_into(acc, model, zip(indices, loader), device=device, amp=amp, on_prediction=on_prediction,
                      bar=bar, mode=mode, crop_size=crop_size, stride=stride, batched_slide=batched_slide)
        if sharded:
            acc.all_reduce()
    finally:
        if bar is not None:
            bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    result = acc.compute()
    if result["out_of_range_label_pixels"]:
        warnings.warn(
            f"{result['out_of_range_label_pixels']} label pixels hold ids outside [0, {n_classes}) "
            f"that are not {ignore_index}: are the labels converted to train ids (`dida convert`)?",
            stacklevel=2,
        )
    result["seconds"] = seconds
    result["images_per_s"] = result["num_images"] / seconds if seconds > 0 else float("nan")
    return result


def _shard(total: int, distributed: bool) -> tuple[list[int], int, bool]:
    """This process's image indices (every world_size-th one when sharded), its rank, whether sharded."""
    import torch.distributed as dist

    sharded = distributed and dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    return list(range(rank, total, world)), rank, sharded


def _loader(dataset: Any, indices: list[int], device: torch.device, num_workers: int) -> Any:
    """One item at a time (``batch_size=None``), decoded by ``num_workers`` worker processes."""
    from torch.utils.data import DataLoader, Subset

    return DataLoader(Subset(dataset, indices), batch_size=None, collate_fn=_collate_item,
                      num_workers=num_workers, pin_memory=device.type == "cuda")


def _progress_bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="eval", dynamic_ncols=True, file=sys.stderr)


def _predict_into(
    acc: MetricAccumulator,
    model: nn.Module,
    items: Iterable[tuple[int, dict[str, Any]]],
    *,
    device: torch.device,
    amp: str,
    on_prediction: Callable[[int, dict[str, Any], torch.Tensor], None] | None,
    bar: Any,
    **inference_kwargs: Any,
) -> None:
    """Predict every ``(index, item)`` in eval mode (the model's mode is restored) and count it in ``acc``."""
    from dida.models import inference

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index, item in items:
                img, label = _item_to_device(item, device)
                with autocast(device, amp):
                    probs = inference(model, img[None], out_size=tuple(label.shape[-2:]), **inference_kwargs)
                pred = probs.argmax(dim=1)[0]
                acc.update(pred, label)
                if on_prediction is not None:
                    on_prediction(index, item, pred)
                if bar is not None:
                    bar.update(1)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------- prediction export


def trainid_to_labelid_lut() -> np.ndarray:
    """``[256]`` uint8 table: Cityscapes train id -> label id; 255 and unknown ids -> 0 (unlabeled)."""
    from dida.constants import CITYSCAPES_ID_TO_TRAINID

    lut = np.zeros(256, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAINID.items():
        lut[train_id] = label_id
    return lut


def _prediction_stem(filename: str, img_root: Path | None, img_suffix: str) -> Path:
    """Relative output stem of an image: its path below ``img_root`` without ``img_suffix``."""
    path = Path(filename)
    rel = Path(path.name)
    if img_root is not None:
        try:
            rel = path.relative_to(img_root)
        except ValueError:
            rel = Path(path.name)
    name = rel.name
    if img_suffix and name.endswith(img_suffix):
        name = name[: -len(img_suffix)]
    else:
        name = Path(name).stem
    return rel.parent / name


class PredictionWriter:
    """Writes predictions of ``dida test --save-preds`` in a background thread (``on_prediction``).

    Layout under ``out_dir`` (``<rel>`` = image path below the image folder, suffix removed):
      - ``color/<rel><img_suffix>``: Cityscapes palette (the reference's ``--show-dir`` images at opacity 1);
      - ``trainid/<rel>_labelTrainIds.png``: raw train ids;
      - ``cityscapes/<rel>_labelIds.png``: Cityscapes label ids (255 -> 0) for the official evaluation
        (``evalPixelLevelSemanticLabeling`` matches ``<city>_<seq>_<frame>*.png`` recursively, so this
        folder must hold exactly one file per frame).
    """

    def __init__(
        self, out_dir: str | Path, formats: Sequence[str], img_root: Path | None, img_suffix: str,
        num_classes: int,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.formats = set(formats)
        self.img_root = img_root
        self.img_suffix = img_suffix
        self.palette_bgr = palette_lut(num_classes)[:, ::-1].copy()
        self.labelid_lut = trainid_to_labelid_lut()
        self._pool = ThreadPoolExecutor(max_workers=2)
        self._pending: list[Future[None]] = []

    def __call__(self, index: int, item: dict[str, Any], pred: torch.Tensor) -> None:
        pred_np = pred.to(torch.uint8).cpu().numpy()
        stem = _prediction_stem(str(item["filename"]), self.img_root, self.img_suffix)
        self._pending.append(self._pool.submit(self._write, stem, pred_np))
        if len(self._pending) > 16:  # bound memory; surface write errors early
            self._pending.pop(0).result()

    def _write(self, stem: Path, pred: np.ndarray) -> None:
        suffix = self.img_suffix if self.img_suffix.endswith(".png") else ".png"
        if "color" in self.formats:
            write_png(self.out_dir / "color" / stem.parent / f"{stem.name}{suffix}", self.palette_bgr[pred])
        if "trainid" in self.formats:
            write_png(self.out_dir / "trainid" / stem.parent / f"{stem.name}_labelTrainIds.png", pred)
        if "cityscapes" in self.formats:
            write_png(self.out_dir / "cityscapes" / stem.parent / f"{stem.name}_labelIds.png",
                      self.labelid_lut[pred])

    def close(self) -> None:
        try:
            for f in self._pending:
                f.result()
        finally:
            self._pending.clear()
            self._pool.shutdown(wait=True)

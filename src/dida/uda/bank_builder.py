"""Build a class-balanced instance bank from a source-trained model (``dida bank build``, whose command is
``dida.commands.bank``).

The shipped DIDA banks are non-negative per-image class means of the decoder embedding, class
balanced, with labels in repeating runs of the rare-class order (spec 6.2); which model produced them
is not known. This builder makes banks of that kind:

1. run the model (eval mode, no grad) over source images through the test pipeline (``predict``: for HRDA
   the whole image as context, its embedding being the context branch's, the one DIDA's terms use on HRDA;
   the input is padded to a multiple of the model's ``alignment`` and the padding ignored);
2. per image, the mean embedding of every class present in its label, where the embedding is the
   1/4-resolution decoder output upsampled bilinearly to the label's resolution, as the reference
   upsamples ``embedding_s`` (computed exactly at 1/4 resolution, see ``instance_bank.class_sums``);
3. keep a uniform random sample (reservoir) of at most ``size`` candidates per class;
4. pick ``size`` entries round-robin over the present classes in ``RARE_CLASS_ORDER`` (a class that
   runs out of candidates drops out), so class counts differ by at most one among the classes that
   have enough candidates, and labels come in repeating runs of the rare order.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import nn

from dida.constants import IGNORE_INDEX, RARE_CLASS_ORDER, class_names
from dida.errors import DataError
from dida.runtime import autocast
from dida.uda.instance_bank import InstanceBank, class_sums

__all__ = ["FEATURES_FILE", "LABELS_FILE", "balanced_selection", "build_bank", "class_order", "format_histogram"]

FEATURES_FILE = "f_buffer_s.npz"
LABELS_FILE = "l_buffer_s.npz"


class _Dataset(Protocol):
    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]: ...


def class_order(num_classes: int) -> list[int]:
    """``RARE_CLASS_ORDER`` restricted to ``0 .. num_classes-1``, then any other class ascending."""
    order = [c for c in RARE_CLASS_ORDER if c < num_classes]
    return order + [c for c in range(num_classes) if c not in order]


class _Reservoir:
    """Uniform random sample of at most ``capacity`` vectors per class (Algorithm R), no host tensors."""

    def __init__(self, num_classes: int, capacity: int, dim: int, rng: np.random.Generator) -> None:
        self.capacity = capacity
        self.rng = rng
        self.store = np.zeros((num_classes, capacity, dim), dtype=np.float32)
        self.seen = np.zeros(num_classes, dtype=np.int64)

    def add(self, cls: int, vec: np.ndarray) -> None:
        n = int(self.seen[cls])
        if n < self.capacity:
            self.store[cls, n] = vec
        else:
            j = int(self.rng.integers(0, n + 1))
            if j < self.capacity:
                self.store[cls, j] = vec
        self.seen[cls] = n + 1

    def available(self, cls: int) -> int:
        return int(min(self.seen[cls], self.capacity))


def balanced_selection(available: Sequence[int], size: int, order: Sequence[int]) -> list[int]:
    """Labels of a balanced bank: round-robin over ``order``, skipping classes with nothing left.

    Args:
        available: candidates per class.
        size: K.
        order: visiting order of the classes (rare classes first).

    Returns:
        ``size`` class ids in bank order (repeating runs of ``order``).

    Raises:
        ValueError: fewer than ``size`` candidates in total.
    """
    total = int(sum(available))
    if total < size:
        raise ValueError(f"only {total} candidates for a bank of {size} entries")
    left = list(available)
    labels: list[int] = []
    while len(labels) < size:
        for c in order:
            if left[c] > 0 and len(labels) < size:
                labels.append(c)
                left[c] -= 1
    return labels


@torch.no_grad()
def _class_means(
    model: nn.Module, img: torch.Tensor, label: np.ndarray, num_classes: int, amp: str
) -> tuple[list[int], np.ndarray]:
    """The classes present in ``label`` and the mean embedding ``[n, D]`` of each, for one image.

    Args:
        img: ``[1, 3, h, w]`` after the test pipeline, on the model's device.
        label: ``[H, W]`` train ids at the original resolution.
    """
    # A model that needs aligned input sizes (HRDA: multiples of a context cell), or an image smaller than the
    # model can encode, is padded at the bottom/right with 0 (the mean colour, as mmseg's Pad); the padded pixels
    # are ignored below.
    from dida.models.inference import min_input_side

    multiple, side = int(getattr(model, "alignment", 1)), min_input_side(model)
    h, w = max(img.shape[-2], side), max(img.shape[-1], side)
    pad_h, pad_w = h + (-h) % multiple - img.shape[-2], w + (-w) % multiple - img.shape[-1]
    with autocast(img.device, amp):
        emb = model.predict(torch.nn.functional.pad(img, (0, pad_w, 0, pad_h))).embedding
    # labels at the resized image's resolution (nearest, as mmseg resizes segmentation maps)
    lab = torch.from_numpy(np.array(label, dtype=np.int64)).to(img.device)[None, None]
    lab = torch.nn.functional.interpolate(lab.float(), size=img.shape[-2:], mode="nearest").long()[:, 0]
    lab = torch.nn.functional.pad(lab, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    sums, counts = class_sums(emb.float(), lab, num_classes)
    present = counts > 0
    means = (sums[present] / counts[present, None]).cpu().numpy()
    return torch.nonzero(present).flatten().tolist(), means  # once per image, not per pixel


@torch.no_grad()
def build_bank(
    model: nn.Module,
    dataset: _Dataset,
    size: int,
    num_classes: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    max_images: int | None = None,
    img_scale: Sequence[int] = (1280, 720),
    amp: str = "off",
    progress: bool = True,
) -> InstanceBank:
    """Class-balanced bank of per-image class-mean embeddings.

    Args:
        model: a segmentor (``predict(img) -> SegmentorOutput`` with an ``embedding [1, D, h', w']``: 1/4
            of the input for DAFormer, 1/8 for HRDA's context branch).
        dataset: source dataset with ``load(i) -> (img_bgr, label train ids)``.
        size: K.
        num_classes: C (labels outside ``[0, C)`` are ignored).
        device: where the model runs.
        seed: seeds the reservoir sampling and the order of the images (``np.random.default_rng``).
        max_images: use at most this many images (a random subset when smaller than the dataset).
        img_scale: test-pipeline resize (keep ratio), (long side, short side).
        amp: ``off``, ``bf16`` or ``fp16`` autocast for the model (means are accumulated in float32).
        progress: show a progress bar on stderr.

    Returns:
        An ``InstanceBank`` on the CPU with ``size`` entries.

    Raises:
        DataError: an image without a label, or too few class means for ``size`` entries.
    """
    from tqdm import tqdm

    from dida.data.transforms import TestPipeline

    device = torch.device(device)
    rng = np.random.default_rng(seed)
    n = len(dataset)
    if n == 0:
        raise DataError("the source dataset is empty: nothing to build a bank from.")
    indices = rng.permutation(n)[: max_images if max_images else n]
    pipeline = TestPipeline(img_scale)
    model = model.to(device).eval()
    reservoir: _Reservoir | None = None
    for i in tqdm(indices.tolist(), desc="bank build", unit="img", disable=not progress, file=sys.stderr):
        img_bgr, label = dataset.load(i)
        if label is None:
            raise DataError(f"image {i} of the source dataset has no label: a bank needs labelled source images.")
        img = pipeline(img_bgr).unsqueeze(0).to(device)
        classes, means = _class_means(model, img, label, num_classes, amp)
        if reservoir is None:
            reservoir = _Reservoir(num_classes, size, means.shape[1], rng)
        for c, vec in zip(classes, means):
            reservoir.add(c, vec)
    assert reservoir is not None
    available = [reservoir.available(c) for c in range(num_classes)]
    try:
        labels = balanced_selection(available, size, class_order(num_classes))
    except ValueError:
        raise DataError(
            f"only {sum(available)} class means from {len(indices)} images, fewer than --size {size}. "
            "Use more images (--max-images) or a smaller --size."
        ) from None
    taken = [0] * num_classes
    perm = [rng.permutation(a) for a in available]  # random candidate order per class
    rows = []
    for c in labels:
        rows.append(reservoir.store[c, perm[c][taken[c]]])
        taken[c] += 1
    return InstanceBank(torch.from_numpy(np.stack(rows)), torch.tensor(labels, dtype=torch.int64), num_classes)


def format_histogram(bank: InstanceBank, num_classes: int) -> str:
    """One line per class: train id, name (``dida.constants.class_names``), count."""
    counts = bank.counts_per_class(num_classes).tolist()
    names = class_names(num_classes)
    return "\n".join(f"  {c:>3} {names[c]:<14} {n}" for c, n in enumerate(counts))

"""DIDA's instance bank: K labelled prototype vectors, EMA-updated toward batch class means (spec 6.2-6.3).

The bank is a stateful ``nn.Module`` whose whole state is two buffers, ``features [K, D]`` (float32)
and ``labels [K]`` (int64): it moves with ``.to()``, is saved in ``state_dict`` and restores on resume
(the reference re-read the npz file on resume; spec 6.10.3).

File format (the reference's, spec 6.2): two ``np.savez`` archives, ``f_buffer_s.npz`` holding one
entry ``arr_0`` float32 ``[K, D]`` and ``l_buffer_s.npz`` holding ``arr_0`` int64 ``[K]``. Build one
from a source-trained model with ``dida bank build``.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dida.errors import DataError
from dida.io import atomic_path
from dida.uda.interpolation import downsample_adjoint

_HOW_TO_GET = (
    "Use the reference's f_buffer_s.npz / l_buffer_s.npz (np.savez, one entry 'arr_0'), build one from a "
    "source-trained checkpoint with `dida bank build CHECKPOINT --data ROOT --out DIR`, or set "
    "uda.bank.init=random."
)


def _read_npz_array(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"instance bank {what} file '{path}' does not exist. {_HOW_TO_GET}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise DataError(f"instance bank {what} file '{path}' is not an .npz archive. {_HOW_TO_GET}")
            names = list(archive.files)
            if "arr_0" in names:
                return archive["arr_0"]
            if len(names) == 1:
                return archive[names[0]]
            raise DataError(
                f"instance bank {what} file '{path}' holds entries {names}, expected a single 'arr_0' "
                f"(np.savez(path, array)). {_HOW_TO_GET}"
            )
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"instance bank {what} file '{path}' cannot be read ({e}). {_HOW_TO_GET}") from None


def class_sums(
    embedding: Tensor,
    labels: Tensor,
    num_classes: int,
    class_mean: Literal["reference", "per_image"] = "reference",
) -> tuple[Tensor, Tensor]:
    """Per-class feature sums and position counts at label resolution (float32, no loops).

    Args:
        embedding: ``[B, D, h, w]`` at any resolution; when it differs from the labels', the sums are
            those of the embedding upsampled to the label size (bilinear, ``align_corners=False``, the
            reference's ``embedding_s``), computed exactly at ``h x w`` by pulling the one-hot class
            masks through the transposed interpolation (no ``[B, D, H, W]`` tensor is built).
        labels: ``[B, H, W]`` or ``[B, 1, H, W]``; values outside ``[0, num_classes)`` (255) are ignored.
        num_classes: C.
        class_mean: ``"reference"``: positions of class c in ANY image (a position counted once per
            image that has it) with the features of image 0; ``"per_image"``: each image's own features
            at its own positions.

    Returns:
        ``sums [C, D]`` and ``counts [C]`` (float32; counts are label positions, with multiplicity).
    """
    if labels.ndim == 4:
        if labels.shape[1] != 1:
            raise ValueError(f"labels must be [B, H, W] or [B, 1, H, W], got {tuple(labels.shape)}")
        labels = labels[:, 0]
    if labels.ndim != 3 or embedding.ndim != 4 or labels.shape[0] != embedding.shape[0]:
        raise ValueError(
            f"class sums need embedding [B, D, h, w] and labels [B, H, W], got {tuple(embedding.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if class_mean not in ("reference", "per_image"):
        raise ValueError(f"class_mean must be 'reference' or 'per_image', got {class_mean!r}")
    c = int(num_classes)
    b = embedding.shape[0]
    lab = labels.to(device=embedding.device, dtype=torch.int64)
    lab = torch.where((lab >= 0) & (lab < c), lab, torch.full_like(lab, c))  # ignored -> dump bin c
    masks = torch.zeros((b, c + 1, *lab.shape[1:]), dtype=torch.float32, device=lab.device)
    masks.scatter_(1, lab.unsqueeze(1), 1.0)
    masks = masks[:, :c]  # [B, C, H, W]
    counts = masks.sum(dim=(0, 2, 3))
    if class_mean == "reference":
        masks = masks.sum(dim=0, keepdim=True)  # multiplicity of each position over the batch
    if tuple(masks.shape[-2:]) != tuple(embedding.shape[-2:]):
        masks = downsample_adjoint(masks, tuple(embedding.shape[-2:]))
    feats = embedding.detach().float()
    if class_mean == "reference":
        feats = feats[:1]
    sums = torch.einsum("bcn,bdn->cd", masks.flatten(2), feats.flatten(2))
    return sums, counts


class InstanceBank(nn.Module):
    """K labelled feature prototypes with the reference's EMA update.

    Args:
        features: ``[K, D]`` bank vectors (stored as float32).
        labels: ``[K]`` class of each entry (stored as int64, values ``>= 0``).
        num_classes: classes the update considers; default ``max(labels) + 1``. Batch labels outside
            ``[0, num_classes)`` (e.g. 255) are ignored.

    Attributes:
        features: float32 buffer ``[K, D]``.
        labels: int64 buffer ``[K]``.
    """

    features: Tensor
    labels: Tensor

    def __init__(self, features: Tensor, labels: Tensor, num_classes: int | None = None) -> None:
        super().__init__()
        features = torch.as_tensor(features)
        labels = torch.as_tensor(labels)
        if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"InstanceBank needs features [K, D] and labels [K], got {tuple(features.shape)} and "
                f"{tuple(labels.shape)}"
            )
        if features.shape[0] == 0:
            raise ValueError("InstanceBank needs at least one entry (K >= 1)")
        if labels.is_floating_point() or bool((labels < 0).any()):
            raise ValueError("InstanceBank labels must be non-negative integers")
        self.register_buffer("features", features.detach().to(torch.float32).clone())
        self.register_buffer("labels", labels.detach().to(torch.int64).clone())
        self.num_classes = self._infer_num_classes(num_classes)

    def _infer_num_classes(self, requested: int | None) -> int:
        needed = int(self.labels.max()) + 1
        if requested is None:
            return needed
        if requested < needed:
            raise ValueError(f"num_classes={requested} but the bank holds label {needed - 1}")
        return int(requested)

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.num_classes = max(self.num_classes, int(self.labels.max()) + 1)

    # ------------------------------------------------------------------ construction and files

    @classmethod
    def from_npz(
        cls, features_path: str | os.PathLike[str], labels_path: str | os.PathLike[str], num_classes: int | None = None
    ) -> InstanceBank:
        """Load the reference's ``f_buffer_s.npz`` / ``l_buffer_s.npz`` pair (``np.savez``, ``arr_0``).

        Raises:
            DataError: a file is missing or unreadable, has the wrong rank/dtype, or K differs.
        """
        fpath, lpath = Path(features_path), Path(labels_path)
        f = _read_npz_array(fpath, "features")
        lab = _read_npz_array(lpath, "labels")
        if f.ndim != 2 or not np.issubdtype(f.dtype, np.floating):
            raise DataError(
                f"instance bank features file '{fpath}' holds {f.dtype} {f.shape}, expected float32 [K, D]. "
                + _HOW_TO_GET
            )
        if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
            raise DataError(
                f"instance bank labels file '{lpath}' holds {lab.dtype} {lab.shape}, expected int64 [K]. "
                + _HOW_TO_GET
            )
        if f.shape[0] != lab.shape[0]:
            raise DataError(
                f"instance bank files disagree on K: '{fpath}' has {f.shape[0]} rows, '{lpath}' has "
                f"{lab.shape[0]} labels. Use a matching pair. " + _HOW_TO_GET
            )
        if f.shape[0] == 0 or (lab < 0).any():
            raise DataError(f"instance bank labels file '{lpath}' is empty or holds negative labels. {_HOW_TO_GET}")
        if not np.isfinite(f).all():
            raise DataError(f"instance bank features file '{fpath}' holds NaN or inf values (non-finite). "
                            + _HOW_TO_GET)
        if num_classes is not None and int(lab.max()) >= num_classes:
            raise DataError(
                f"instance bank labels file '{lpath}' holds class {int(lab.max())}, but the model has "
                f"{num_classes} classes. Use a bank built for this label set. " + _HOW_TO_GET
            )
        return cls(torch.from_numpy(f.astype(np.float32)), torch.from_numpy(lab.astype(np.int64)), num_classes)

    def save_npz(self, features_path: str | os.PathLike[str], labels_path: str | os.PathLike[str]) -> None:
        """Write the reference format (``np.savez``, entry ``arr_0``, float32 / int64), atomically."""
        for path, arr in (
            (features_path, self.features.detach().cpu().numpy().astype(np.float32)),
            (labels_path, self.labels.detach().cpu().numpy().astype(np.int64)),
        ):
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, arr)

    @classmethod
    def random(
        cls,
        size: int,
        dim: int,
        num_classes: int,
        generator: torch.Generator | None = None,
        nonnegative: bool = True,
    ) -> InstanceBank:
        """Random unit vectors with balanced labels ``k mod num_classes`` (reference ``create_buffer.py``).

        Args:
            size: K.
            dim: D.
            num_classes: labels cycle over ``0 .. num_classes-1`` (class counts differ by at most 1).
            generator: CPU ``torch.Generator`` for reproducibility.
            nonnegative: take ``|x|`` before normalising. Embeddings are post-ReLU, so a non-negative
                bank keeps every similarity ``>= 0`` and the sum-normalised distributions well defined
                (with signed vectors ``sum_k s_k`` can be 0 or negative and the loss NaN).
        """
        if size < 1 or dim < 1 or num_classes < 1:
            raise ValueError(f"InstanceBank.random needs size, dim, num_classes >= 1, got {size}, {dim}, {num_classes}")
        f = torch.randn(size, dim, generator=generator, dtype=torch.float32)
        if nonnegative:
            f = f.abs()
        f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
        labels = torch.arange(size, dtype=torch.int64) % num_classes
        return cls(f, labels, num_classes)

    # ------------------------------------------------------------------ read-only

    @property
    def num_entries(self) -> int:
        """K."""
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        """D."""
        return self.features.shape[1]

    def counts_per_class(self, num_classes: int | None = None) -> Tensor:
        """Entries per class, int64 ``[num_classes]``."""
        return torch.bincount(self.labels, minlength=num_classes or self.num_classes)

    def similarity(self, embedding: Tensor) -> Tensor:
        """Raw dot products with every entry (spec 6.5): ``[B, D, h, w] -> [B, K, h, w]``.

        No normalisation and no temperature. Computed in the embedding's dtype.
        """
        return torch.einsum("bdhw,kd->bkhw", embedding, self.features.to(embedding.dtype))

    def extra_repr(self) -> str:
        return f"entries={self.num_entries}, dim={self.dim}, num_classes={self.num_classes}"

    # ------------------------------------------------------------------ update

    def class_sums(
        self, embedding: Tensor, labels: Tensor, class_mean: Literal["reference", "per_image"] = "reference"
    ) -> tuple[Tensor, Tensor]:
        """``class_sums`` (module function) with this bank's ``num_classes``; checks the embedding dim."""
        if embedding.ndim == 4 and embedding.shape[1] != self.dim:
            raise ValueError(f"embedding has {embedding.shape[1]} channels, the bank has dim {self.dim}")
        return class_sums(embedding, labels, self.num_classes, class_mean)

    @torch.no_grad()
    def update(
        self,
        embedding: Tensor,
        labels: Tensor,
        momentum: float,
        class_mean: Literal["reference", "per_image"] = "reference",
        absent: Literal["decay", "skip"] = "decay",
    ) -> None:
        """EMA of every entry toward the batch mean of its class (spec 6.3): ``f <- m f + (1-m) mean``.

        Args:
            embedding: student source embedding ``[B, D, h, w]`` (any resolution, see ``class_sums``).
            labels: source ground truth ``[B, H, W]`` or ``[B, 1, H, W]`` (255 ignored).
            momentum: EMA momentum (reference 0.999).
            class_mean: ``"reference"`` (quirk: positions from the whole batch, features from image 0)
                or ``"per_image"``.
            absent: ``"decay"`` (reference: a class with no position gets mean 0, so its entries shrink
                by ``momentum``) or ``"skip"`` (its entries are left untouched).

        Distributed: when ``torch.distributed`` is initialised, class sums and counts are summed over
        ranks before the division, so every rank applies the same update: the count-weighted mean of
        the per-rank quantities (for ``per_image`` exactly the single-process result on the global
        batch; for ``reference``, each rank contributes its own image 0 at its own positions).
        """
        if absent not in ("decay", "skip"):
            raise ValueError(f"absent must be 'decay' or 'skip', got {absent!r}")
        sums, counts = self.class_sums(embedding, labels, class_mean)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        sums = sums.to(self.features.device)
        counts = counts.to(self.features.device)
        means = sums / counts.clamp_min(1.0).unsqueeze(1)  # absent class: 0 / 1 = 0 (reference)
        target = means.index_select(0, self.labels)
        new = momentum * self.features + (1.0 - momentum) * target
        if absent == "skip":
            present = counts.index_select(0, self.labels) > 0
            new = torch.where(present.unsqueeze(1), new, self.features)
        self.features.copy_(new)

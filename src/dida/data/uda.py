"""Source/target pairs for UDA training, and the validation wrapper.

``SourceTargetDataset[k]`` derives all its randomness from ``np.random.default_rng([seed, k])`` where
``k`` is the global sample counter, so a batch depends only on (seed, k): identical for any number of
loader workers and exactly reproducible after a resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from dida.constants import IGNORE_INDEX
from dida.data.rcs import RareClassSampler
from dida.data.transforms import PseudoMarginMask, TestPipeline, TrainPipeline
from dida.errors import DataError


class SegmentationSource(Protocol):
    samples: list[tuple[str, str | None]]

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]: ...


class SourceTargetDataset:
    """Labelled source sample (optionally rare-class sampled) + unlabelled target sample per index.

    Args:
        source, target: datasets with ``.samples`` and ``load(i)``.
        source_pipeline, target_pipeline: ``TrainPipeline`` objects.
        rcs: a ``RareClassSampler`` built from the source statistics, or None (uniform source).
        seed: base seed; sample ``k`` uses ``np.random.default_rng([seed, k])``.
        min_crop_ratio: with RCS, the crop must hold more than ``rcs.min_pixels * min_crop_ratio``
            pixels of the drawn class; the pipeline is re-run on the same image up to 10 times.
        max_redraws: consecutive unreadable samples tolerated within one item before giving up.
        valid_mask: HRDA's pseudo-label validity margins of the target (``data.target.pseudo_margins``), or
            None. The mask goes through the target pipeline with the image (same resize rule, same crop and
            flip draws), so the random stream, and every image, is the same with or without it.

    ``__getitem__(k)`` returns a dict: ``img`` [3, h, w] float32, ``label`` [h, w] int64,
    ``target_img`` [3, h, w] float32, ``target_label`` [h, w] int64 (255 where the target has none;
    unused by training), ``source_file``, ``target_file`` (image paths), ``rcs_class`` (int, -1 without
    RCS), ``bad_files`` (paths of corrupt files skipped for this item, each replaced by another draw) and,
    with ``valid_mask``, ``valid_pseudo_mask`` [h, w] uint8 (1 where pseudo-labels count).
    """

    def __init__(self, source: SegmentationSource, target: SegmentationSource, source_pipeline: TrainPipeline,
                 target_pipeline: TrainPipeline, rcs: RareClassSampler | None = None, seed: int = 0,
                 min_crop_ratio: float = 0.5, max_redraws: int = 50, *,
                 valid_mask: PseudoMarginMask | None = None) -> None:
        if len(source) == 0 or len(target) == 0:
            raise DataError("source and target datasets must both hold at least one sample.")
        self.source, self.target = source, target
        self.source_pipeline, self.target_pipeline = source_pipeline, target_pipeline
        self.rcs = rcs
        self.seed = int(seed)
        self.min_crop_ratio = float(min_crop_ratio)
        self.max_redraws = int(max_redraws)
        self.valid_mask = valid_mask
        self.file_to_index: dict[str, int] = {}
        if rcs is not None:
            # The statistics name label files; map their basename to the source index.
            for i, (_, label_path) in enumerate(source.samples):
                if label_path is not None:
                    self.file_to_index[label_path.replace("\\", "/").split("/")[-1]] = i
            missing = sorted({f for names in rcs.files.values() for f in names} - set(self.file_to_index))
            if missing:
                raise DataError(
                    f"{missing[0]}: named by the rare-class statistics but not a label of the source dataset "
                    f"({len(missing)} such files). The statistics belong to another dataset or are stale: "
                    "re-run `dida convert` on the source root (or point data.rcs.stats_dir at the right one)."
                )

    def __len__(self) -> int:
        return len(self.source) * len(self.target)

    # -- sampling ---------------------------------------------------------------------------------

    def _source_sample(
        self, rng: np.random.Generator, bad_files: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, str, int]:
        last_error = ""
        for _ in range(self.max_redraws + 1):
            if self.rcs is not None:
                cls, name = self.rcs.sample(rng)
                index = self.file_to_index[name]
            else:
                cls, index = -1, int(rng.integers(len(self.source)))
            try:
                img, label = self.source.load(index)
                if label is None:
                    raise DataError(f"{self.source.samples[index][0]}: source sample has no label.")
                img, label = self.source_pipeline.resize(img, label)
            except DataError as e:
                bad_files.append(getattr(e, "path", self.source.samples[index][0]))
                last_error = str(e)
                continue
            img_t, label_t = self.source_pipeline.random_part(img, label, rng)
            if self.rcs is not None and self.min_crop_ratio > 0:
                threshold = self.rcs.min_pixels * self.min_crop_ratio
                # Reference: at most 10 re-runs of the pipeline on the same image, the last one unchecked.
                for _ in range(10):
                    if np.count_nonzero(label_t.numpy() == cls) > threshold:
                        break
                    img_t, label_t = self.source_pipeline.random_part(img, label, rng)
            return img_t, label_t, self.source.samples[index][0], cls
        raise DataError(f"{self.max_redraws + 1} source samples in a row could not be read (last: "
                        f"{last_error}). Check that the dataset is in place and its files are readable.")

    def _target_sample(
        self, rng: np.random.Generator, bad_files: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str]:
        last_error = ""
        for _ in range(self.max_redraws + 1):
            index = int(rng.integers(len(self.target)))
            try:
                img, label = self.target.load(index)
            except DataError as e:
                bad_files.append(getattr(e, "path", self.target.samples[index][0]))
                last_error = str(e)
                continue
            if label is None:
                label = np.full(img.shape[:2], IGNORE_INDEX, dtype=np.uint8)
            path = self.target.samples[index][0]
            if self.valid_mask is None:
                img_t, label_t = self.target_pipeline(img, label, rng)
                return img_t, label_t, None, path
            return (*self._masked_target(img, label, path, rng), path)
        raise DataError(f"{self.max_redraws + 1} target samples in a row could not be read (last: "
                        f"{last_error}). Check that the dataset is in place and its files are readable.")

    def _masked_target(self, img: np.ndarray, label: np.ndarray, path: str, rng: np.random.Generator
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The target pipeline with the validity mask carried along (the same draws as without it)."""
        assert self.valid_mask is not None
        pipeline = self.target_pipeline
        if img.shape[:2] != label.shape[:2]:
            raise DataError(f"{path}: image {img.shape[:2]} and label {label.shape[:2]} sizes differ.")
        img, label = pipeline.resize(img, label)
        mask = pipeline.resize_mask(self.valid_mask(*img.shape[:2]))
        if mask.shape != label.shape:
            raise DataError(
                f"{path}: this image resizes to {label.shape[1]}x{label.shape[0]}, but the reference's fixed "
                f"1024x2048 pseudo-margin canvas to {mask.shape[1]}x{mask.shape[0]} (quirk Q17: it fits 2:1 "
                "images only). Set data.target.pseudo_margins_canvas=image (margins in pixels of the image).")
        return pipeline.random_part_masked(img, label, mask, rng, pad_value=self.valid_mask.pad_value)

    def __getitem__(self, k: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, int(k)])
        bad_files: list[str] = []
        img, label, source_file, cls = self._source_sample(rng, bad_files)
        target_img, target_label, valid, target_file = self._target_sample(rng, bad_files)
        item = {
            "img": img, "label": label, "target_img": target_img, "target_label": target_label,
            "source_file": source_file, "target_file": target_file, "rcs_class": cls, "bad_files": bad_files,
        }
        if valid is not None:
            item["valid_pseudo_mask"] = valid
        return item


def collate_uda(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of ``SourceTargetDataset`` items: tensors -> [B, ...]; names -> lists;
    ``rcs_class`` -> int64 [B]; ``bad_files`` -> one flat list; ``valid_pseudo_mask`` -> uint8 [B, h, w]
    when the items carry it."""
    extra = {"valid_pseudo_mask": torch.stack([b["valid_pseudo_mask"] for b in batch])} \
        if batch and "valid_pseudo_mask" in batch[0] else {}
    return {
        **extra,
        "img": torch.stack([b["img"] for b in batch]),
        "label": torch.stack([b["label"] for b in batch]),
        "target_img": torch.stack([b["target_img"] for b in batch]),
        "target_label": torch.stack([b["target_label"] for b in batch]),
        "source_file": [b["source_file"] for b in batch],
        "target_file": [b["target_file"] for b in batch],
        "rcs_class": torch.tensor([b["rcs_class"] for b in batch], dtype=torch.int64),
        "bad_files": [f for b in batch for f in b["bad_files"]],
    }


class ValDataset:
    """Test-pipeline view of a labelled dataset for evaluation.

    ``__getitem__(i)`` -> dict ``img`` [3, h, w] float32 (keep-ratio resize + normalise), ``label``
    (uint8 numpy [H, W] at the original resolution, or None), ``filename`` (image path), ``ori_shape``
    (H, W).
    """

    def __init__(self, dataset: SegmentationSource, img_scale: Sequence[int] = (1024, 512)) -> None:
        self.dataset = dataset
        self.pipeline = TestPipeline(img_scale)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        img, label = self.dataset.load(index)
        return {
            "img": self.pipeline(img), "label": label, "filename": self.dataset.samples[index][0],
            "ori_shape": tuple(img.shape[:2]),
        }

"""Datasets, pipelines, rare-class sampling, loaders and the label converter.

Builders here are the only place where config objects are translated into constructor arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Union

from dida.data.cityscapes import CityscapesDataset
from dida.data.folder import FolderDataset
from dida.data.gta import GTADataset
from dida.data.kinds import DATASET_KINDS, default_root
from dida.data.rcs import RareClassSampler
from dida.data.synthia import SynthiaDataset
from dida.data.transforms import (
    PseudoMarginMask,
    TestPipeline,
    TrainPipeline,
    load_image,
    load_label,
    preprocess_test_image,
)
from dida.data.uda import SourceTargetDataset, ValDataset, collate_uda
from dida.errors import DataError

if TYPE_CHECKING:
    from dida.config import DataCfg, DatasetCfg

Dataset = Union[CityscapesDataset, GTADataset, SynthiaDataset, FolderDataset]

__all__ = [
    "DATASET_KINDS",
    "CityscapesDataset",
    "FolderDataset",
    "GTADataset",
    "PseudoMarginMask",
    "RareClassSampler",
    "SourceTargetDataset",
    "SynthiaDataset",
    "TestPipeline",
    "TrainPipeline",
    "ValDataset",
    "build_dataset",
    "build_pseudo_margin_mask",
    "build_train_pipeline",
    "build_uda_datasets",
    "collate_uda",
    "dataset_root",
    "load_image",
    "load_label",
    "preprocess_test_image",
]

def dataset_root(cfg: DatasetCfg) -> Path:
    """``cfg.root``, or ``$DIDA_DATA_ROOT/<kind folder>`` (``data/<kind folder>`` when unset)."""
    if cfg.root:
        return Path(cfg.root)
    root = default_root(cfg.kind) if cfg.kind in DATASET_KINDS else None
    if root is None:
        raise DataError(f"no root given for the {cfg.kind} dataset: set data.<source|target|val>.root.")
    if not Path(root).exists():
        raise DataError(f"no root given for the {cfg.kind} dataset and its default {root} does not exist: set "
                        "data.<source|target|val>.root, or DIDA_DATA_ROOT to the folder that holds "
                        f"{DATASET_KINDS[cfg.kind].folder}/.")
    return Path(root)


def build_dataset(cfg: DatasetCfg, num_classes: int | None = None) -> Dataset:
    """The dataset described by a ``DatasetCfg`` (its ``kind`` in ``DATASET_KINDS``)."""
    kind = DATASET_KINDS.get(cfg.kind)
    if kind is None:
        raise DataError(f"unknown dataset kind '{cfg.kind}'; known: {', '.join(DATASET_KINDS)}.")
    return kind.build(cfg, dataset_root(cfg), num_classes)


def build_train_pipeline(cfg: DatasetCfg) -> TrainPipeline:
    return TrainPipeline(cfg.img_scale, cfg.crop_size, cfg.cat_max_ratio, cfg.flip_prob)


def build_pseudo_margin_mask(cfg: DatasetCfg) -> PseudoMarginMask | None:
    """HRDA's pseudo-label validity margins of a target dataset (``pseudo_margins``), or None when off."""
    if cfg.pseudo_margins is None:
        return None
    return PseudoMarginMask(margins=cfg.pseudo_margins, canvas=cfg.pseudo_margins_canvas)


def build_uda_datasets(data_cfg: DataCfg, seed: int = 0, num_classes: int | None = None
                       ) -> tuple[SourceTargetDataset, ValDataset]:
    """Training pairs (source with RCS when enabled + target) and the validation dataset.

    The RCS statistics are read from ``data.rcs.stats_dir`` or the source root; a missing file is a
    ``DataError`` that says to run ``dida convert``.
    """
    source = build_dataset(data_cfg.source, num_classes)
    target = build_dataset(data_cfg.target, num_classes)
    rcs = None
    if data_cfg.rcs.enabled:
        stats_dir = Path(data_cfg.rcs.stats_dir) if data_cfg.rcs.stats_dir else dataset_root(data_cfg.source)
        rcs = RareClassSampler.from_stats(stats_dir, data_cfg.rcs.temperature, data_cfg.rcs.min_pixels)
    train = SourceTargetDataset(
        source, target, build_train_pipeline(data_cfg.source), build_train_pipeline(data_cfg.target),
        rcs=rcs, seed=seed, min_crop_ratio=data_cfg.rcs.min_crop_ratio,
        valid_mask=build_pseudo_margin_mask(data_cfg.target),
    )
    val = ValDataset(build_dataset(data_cfg.val, num_classes), data_cfg.val.img_scale)
    return train, val

"""Checkpoints: reading and writing files (``io``), recognising formats (``formats``), strict loading into
models (``load``) and the training state of a run (``training``).

Supported inputs, detected automatically: dida checkpoints, mmcv DAFormer / DIDA training checkpoints
(``model.`` / ``ema_model.`` / ``imnet_model.``), bare segmentor state dicts, and the published weights of
a registered backbone (MiT: official SegFormer ImageNet files and Hugging Face SegFormer encoders), which
the backbone's own ``WeightFormat`` converts (``dida.models.registry``).
"""

from __future__ import annotations

from dida.checkpoint.formats import (
    MMCV_PREFIXES,
    detect_format,
    detect_weight_format,
    is_tensor_dict,
    split_mmcv_state_dict,
    strip_prefix,
    unwrap,
)
from dida.checkpoint.io import FORMAT_NAME, FORMAT_VERSION, read_checkpoint, save_checkpoint
from dida.checkpoint.load import (
    infer_model_fields,
    load_checkpoint,
    load_pretrained,
    load_state_dict_strict,
    model_cfg_from_checkpoint,
)
from dida.checkpoint.training import (
    TrainingState,
    link_checkpoint,
    list_checkpoints,
    restore_training_state,
    resume_checkpoint,
    training_state_dict,
    write_checkpoint,
)

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "MMCV_PREFIXES", "TrainingState", "detect_format", "detect_weight_format",
    "infer_model_fields", "is_tensor_dict", "link_checkpoint", "list_checkpoints", "load_checkpoint", "load_pretrained",
    "load_state_dict_strict", "model_cfg_from_checkpoint", "read_checkpoint", "restore_training_state",
    "resume_checkpoint",
    "save_checkpoint", "split_mmcv_state_dict", "strip_prefix", "training_state_dict", "unwrap",
    "write_checkpoint",
]

"""The configuration schema (nested dataclasses) and ``load_config``.

Flow (as in DINOv2's ``get_cfg_from_args``): structured defaults -> ``configs/base.yaml`` -> the preset
or user YAML -> dotted command-line overrides -> validated dataclass objects. Unknown keys and wrong
types fail before any work starts; ranges are checked by ``validate``. Constructors never see these
objects: builders translate them into typed keyword arguments.

Every default reproduces the reference implementations (DAFormer / DIDA experiments 7 and 8; HRDA / MIC as
lhoyer/MIC computes them); deliberate departures are named options (docs/design.md).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dida.constants import NUM_CLASSES, THING_CLASSES
from dida.errors import ConfigError

# ----------------------------------------------------------------------------------------- model


@dataclass
class HRDACfg:
    """HRDA's multi-resolution segmentor, read when ``segmentor: hrda``.

    Defaults are the MIC(HRDA) presets. Not configurable: the detail scale (1, as every reference
    preset and ablation) and ``feature_scale`` (the context features feed the feature distance).
    """

    # Input scales (context, detail), sorted ascending as the reference does (Q3); the detail scale must be 1.
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0])
    # Detail (HR) crop c as (height, width) in full-resolution pixels (`hr_crop_size`); null: no crop.
    detail_crop_size: Optional[list[int]] = field(default_factory=lambda: [512, 512])
    # d: the detail-crop offsets are multiples of d; must be a multiple of the output stride (4).
    crop_divisor: int = 8
    # Reference quirk Q1: the offset flush with the bottom/right edge is never drawn; True makes it reachable.
    allow_last_offset: bool = False
    # Weight of the detail-crop CE (`hr_loss_weight`); the fused CE gets 1 - hr - lr.
    hr_loss_weight: float = 0.1
    # Weight of the CE on the attention-scaled context logits (`lr_loss_weight`, quirk Q7).
    lr_loss_weight: float = 0.0
    # One attention channel per class (else a single channel).
    attention_classwise: bool = True
    # Width of the scale-attention head (`attention_embed_dim`).
    attention_embed_dim: int = 256
    # A constant attention instead of the learned head (the `fixedatt` ablation uses 0.5); null: learned.
    fixed_attention: Optional[float] = None
    # Test time: the detail branch by sliding c-windows (`hr_slide_inference`); else one whole-image pass.
    slide_inference: bool = True
    # Detail slide stride c/2 (`hr_slide_overlapping`); False: stride c.
    slide_overlap: bool = True
    # Ablation `blurhr`: the detail input is the image down- then up-sampled by 2 (`blur_hr_crop`).
    blur_detail: bool = False
    # Activation checkpointing of the backbone in training forwards (same numbers, less memory).
    checkpoint_backbone: bool = False


@dataclass
class ViTCfg:
    """Foundation-model ViT backbones (``dinov2_*``, ``dinov3_*`` through ``transformers``), read only for them.

    Defaults: the named variant as published (``dida.models.foundation.VIT_VARIANTS``), the pyramid fed by four
    evenly spaced blocks, every block trained. ``model.drop_path_rate`` is the stochastic depth of the last block
    (linear from 0, as timm/BEiT).
    """

    # Blocks (1-based) whose outputs feed the pyramid levels at strides 4, 8, 16, 32; null: four evenly spaced
    # blocks ending with the last (12 blocks: 3, 6, 9, 12), as BEiT / ViT-Adapter segmentation models do.
    out_indices: Optional[list[int]] = None
    # The patch embeddings and the first N blocks are frozen (requires_grad False: no gradient is computed
    # below block N+1, no drop-path there); 0: everything trains (mmseg's frozen_stages convention).
    frozen_blocks: int = 0
    # Architecture overrides of the named variant (small test models, custom weights); null: the variant's.
    hidden_size: Optional[int] = None
    # Override: transformer blocks; null: the variant's.
    num_layers: Optional[int] = None
    # Override: attention heads; null: the variant's.
    num_heads: Optional[int] = None
    # Override: patch side in px; null: the variant's.
    patch_size: Optional[int] = None
    # Side in px of the pretraining position-embedding grid (DINOv2: 518 = 37 patches; RoPE models ignore it).
    image_size: Optional[int] = None


@dataclass
class ModelCfg:
    """A segmentor on a backbone (tables in ``dida.models.registry``).

    ``segmentor`` and ``backbone`` name entries of ``SEGMENTORS`` / ``BACKBONES``; ``embed_dims`` /
    ``num_heads`` / ``depths`` / ``drop_path_rate`` override a MiT variant; ``vit`` configures the foundation
    ViT backbones; the decoder keys configure the DAFormer head.
    """

    # The segmentor (dida.models.registry.SEGMENTORS): encoder_decoder = backbone + DAFormer head; hrda = HRDA's
    # multi-resolution model.
    segmentor: str = "encoder_decoder"
    # The backbone (dida.models.registry.BACKBONES): MiT b0-b5, or a DINOv2 / DINOv3 ViT through transformers.
    backbone: str = "mit_b5"
    # MiT override: stage widths (custom or tiny models); null: the variant's.
    embed_dims: Optional[list[int]] = None
    # MiT override: attention heads per stage; null: the variant's.
    num_heads: Optional[list[int]] = None
    # MiT override: transformer blocks per stage; null: the variant's.
    depths: Optional[list[int]] = None
    # Stochastic depth of the backbone, linear over all blocks (the reference's 0.1).
    drop_path_rate: float = 0.1
    # Channels of the DAFormer head's embeddings and fusion (the DIDA embedding's width).
    decoder_channels: int = 256
    # Dilations of the head's depthwise-separable ASPP fusion.
    aspp_dilations: list[int] = field(default_factory=lambda: [1, 6, 12, 18])
    # Dropout2d before the classifier.
    dropout_ratio: float = 0.1
    # Output classes (19 Cityscapes train ids).
    num_classes: int = NUM_CLASSES
    # ImageNet MiT weights (official .pth, HF .safetensors/.bin) or a foundation model's Hugging Face weights
    # (model.safetensors, or the folder holding it) for the student and the FD model.
    pretrained: Optional[str] = None
    # Only for segmentor == "hrda".
    hrda: HRDACfg = field(default_factory=HRDACfg)
    # Only for the foundation ViT backbones (dinov2_*, dinov3_*).
    vit: ViTCfg = field(default_factory=ViTCfg)


# ------------------------------------------------------------------------------------------ data


@dataclass
class DatasetCfg:
    """One dataset and its pipeline. ``img_scale`` is mmseg's (long, short) keep-ratio scale."""

    kind: str = "cityscapes"  # an entry of dida.data.kinds.DATASET_KINDS
    root: str = ""
    split: str = "train"
    img_scale: list[int] = field(default_factory=lambda: [1024, 512])
    crop_size: list[int] = field(default_factory=lambda: [512, 512])  # (height, width)
    cat_max_ratio: float = 1.0
    flip_prob: float = 0.5
    # Only for kind == "folder": images and labels in two folders, matched by name.
    img_dir: str = "images"
    label_dir: str = "labels"
    img_suffix: str = ".png"
    label_suffix: str = "_labelTrainIds.png"
    # Target only: HRDA's pseudo-label validity margins ("plcrop v2") as [top, bottom, left,
    # right] pixels of the canvas below. The mask is resized (nearest), cropped and flipped with the image and
    # delivered as `valid_pseudo_mask`: the pseudo-weight is 0 outside it. null: off.
    pseudo_margins: list[int] | None = None
    # The margin mask's canvas. "reference" (quirk Q17): a fixed 1024x2048 canvas resized by its own keep-ratio
    # factor (fits 2:1 images only; padding fills 255); "image": the loaded image's size (padding fills 0).
    pseudo_margins_canvas: Literal["reference", "image"] = "reference"


@dataclass
class RareClassSamplingCfg:
    # Rare class sampling of the source (DAFormer's RCS): rarer classes are drawn more often.
    enabled: bool = True
    # Its temperature T: p(c) ~ exp((1 - f_c) / T); smaller favours rare classes more.
    temperature: float = 0.01
    # A class counts in an image when it covers more than this many pixels (at the original size).
    min_pixels: int = 3000
    # A crop is accepted when it holds more than min_pixels * min_crop_ratio pixels of the class (10 retries).
    min_crop_ratio: float = 0.5
    # Default: <source root>/sample_class_stats.json and samples_with_class.json written by `dida convert`.
    stats_dir: Optional[str] = None


@dataclass
class DataCfg:
    source: DatasetCfg = field(
        default_factory=lambda: DatasetCfg(kind="gta", img_scale=[1280, 720], cat_max_ratio=0.75)
    )
    target: DatasetCfg = field(default_factory=lambda: DatasetCfg(kind="cityscapes", split="train"))
    val: DatasetCfg = field(
        default_factory=lambda: DatasetCfg(kind="cityscapes", split="val", flip_prob=0.0)
    )
    rcs: RareClassSamplingCfg = field(default_factory=RareClassSamplingCfg)
    # Images per domain per process (the reference: 2 source + 2 target).
    batch_size: int = 2
    # Data-loader worker processes (results do not depend on it).
    num_workers: int = 4
    # Pinned host memory for faster copies to a GPU.
    pin_memory: bool = True
    # Corrupt samples are logged and replaced; more than this many stops the run with the list of files.
    max_bad_samples: int = 20


# ------------------------------------------------------------------------------------------- UDA


@dataclass
class EMACfg:
    # The teacher's EMA momentum cap: alpha_t = min(1 - 1/(t+1), alpha).
    alpha: float = 0.999
    # Reference: the teacher's BatchNorm runs in train mode (target-batch statistics).
    teacher_bn_eval: bool = False
    # Reference: only parameters are averaged; BN buffers stay the teacher's own.
    update_buffers: bool = False


@dataclass
class FeatureDistanceCfg:
    """DAFormer's ImageNet feature distance on thing classes (a training term)."""

    # The ImageNet feature distance term (DAFormer).
    enabled: bool = True
    # Its loss weight.
    weight: float = 0.005
    # Classes whose cells are pulled towards the ImageNet features (the thing classes).
    classes: list[int] = field(default_factory=lambda: list(THING_CLASSES))
    # A cell of the last feature map counts when its majority class covers at least this fraction.
    scale_min_ratio: float = 0.75
    # The reference logs NaN (and adds no gradient) when no thing cell is present; "zero" logs 0.
    empty_mask: Literal["zero", "nan"] = "zero"


@dataclass
class AugmentCfg:
    # Colour jitter strength s (brightness, contrast, saturation, hue) of the strong augmentation.
    color_jitter_strength: float = 0.2
    # Jitter runs when a uniform draw exceeds this (once per iteration for the batch).
    color_jitter_prob: float = 0.2
    # Gaussian blur (sigma U(0.15, 1.15)) when a uniform draw exceeds 0.5.
    blur: bool = True


@dataclass
class BankCfg:
    """DIDA's instance bank, used by the dual-level term."""

    # from_file: the npz files below (the reference's or `dida bank build`'s); random: unit vectors.
    init: Literal["from_file", "random"] = "from_file"
    features_path: Optional[str] = None  # f_buffer_s.npz
    labels_path: Optional[str] = None  # l_buffer_s.npz
    size: int = 300  # only for init == "random"
    # EMA momentum of the bank entries towards the source class means.
    momentum: float = 0.999
    # Update the bank every this many iterations (iteration 0 included).
    update_interval: int = 50
    # Reference quirk: positions gathered over the whole batch, features read from image 0.
    # "per_image" averages each image's own features over its own positions.
    class_mean: Literal["reference", "per_image"] = "reference"
    # Reference quirk: classes absent from the batch pull their slots towards zero. "skip" leaves them.
    absent_classes: Literal["decay", "skip"] = "decay"


@dataclass
class DualLevelCfg:
    """DIDA's dual-level interaction: the instance bank (``uda.bank``) and the calibrated instance loss
    (a training term)."""

    # DIDA's dual-level term (instance bank, calibrated instance loss).
    enabled: bool = False
    # Weight of the instance loss.
    instance_weight: float = 0.5
    # Calibrated ('gather') target: teacher similarity times the student's logit of the entry's class.
    calibrate: bool = True
    # 1.0 (reference) disables the "scatter" refinement of the semantic pseudo-labels.
    a_smooth: float = 1.0
    # The reference's weak target view is a no-op; True applies it (on a copy, never in place).
    weak_augment: bool = False
    # Rows of pixels per chunk for the memory-bounded instance loss; 0 = direct computation. On CPU it is
    # an upper bound: chunks are also capped at a few MiB so that they stay in cache.
    chunk_rows: int = 64


@dataclass
class MICCfg:
    """MIC's masked image consistency (a training term). Defaults: the MIC(HRDA) presets."""

    # MIC's masked image consistency term.
    enabled: bool = False
    # Masked images: separatetrg = target + pseudo-labels (GTA/SYN->CS presets); separatesrc = source
    # (needs no teacher); separate = [source 0, target 0] (Q15: batch 2 only). "...aug": jitter + blur first.
    mode: Literal["separate", "separateaug", "separatesrc", "separatesrcaug", "separatetrg",
                  "separatetrgaug"] = "separatetrgaug"
    block_size: int = 64  # block side in px: 64 for MIC(HRDA)'s 1024^2 crops, 32 for MIC(DAFormer)'s 512^2
    ratio: float = 0.7  # probability that a block is masked
    # Loss weight. 1 like every MIC preset: the reference's base default 0 would silently zero the fused term
    # and keep only HRDA's detail term (Q12).
    mask_lambda: float = 1.0
    lambda_scope: Literal["seg_only", "all"] = "seg_only"  # seg_only (Q12): mask_lambda skips HRDA's detail term
    blur_gate: Literal["always", "follow_blur"] = "always"  # always (Q13): blur even if uda.augment.blur=false
    blur_sigma: Literal["per_batch", "per_image"] = "per_batch"  # per_batch (Q13): one sigma for the batch
    # The MIC teacher. null / null / true = the reference's 'same'/'same' (every preset): reuse the
    # DACS teacher's pseudo-labels. Anything else builds a separate EMA teacher (ablations, Table 7).
    alpha: Optional[float] = None  # its EMA cap; null = 'same' (uda.ema.alpha); 0 = the student itself
    pseudo_threshold: Optional[float] = None  # its confidence threshold; null = 'same' (uda.pseudo_threshold)
    confidence_weight: bool = True  # false = the reference's mask_pseudo_threshold None: weight 1 everywhere


@dataclass
class UDACfg:
    """The self-training step and its terms.

    ``self_training`` runs DACS (EMA teacher, pseudo-labels, ClassMix, the mixed loss); off, the step trains
    on the source alone. Each term has its own section with an ``enabled`` key: ``feature_distance``
    (DAFormer's ImageNet feature distance), ``dual_level`` with ``bank`` (DIDA). DAFormer is self-training
    with the feature distance; DIDA adds ``dual_level.enabled``.
    """

    # DACS self-training (EMA teacher, pseudo-labels, ClassMix, mixed loss); false: source only.
    self_training: bool = True
    # A target pixel is confident when its teacher probability is >= this; the weight is the confident fraction.
    pseudo_threshold: float = 0.968
    # Target rows at the top whose pseudo-label weight is zeroed (rectification artefacts).
    pseudo_weight_ignore_top: int = 15
    # Target rows at the bottom whose pseudo-label weight is zeroed (the ego vehicle).
    pseudo_weight_ignore_bottom: int = 120
    # Reference quirk: each image draws its mix classes from the union of the whole batch's labels
    # (255 included). "per_image" draws from the image's own classes without 255.
    mix_classes: Literal["batch_union", "per_image"] = "batch_union"
    ema: EMACfg = field(default_factory=EMACfg)
    feature_distance: FeatureDistanceCfg = field(default_factory=FeatureDistanceCfg)
    augment: AugmentCfg = field(default_factory=AugmentCfg)
    bank: BankCfg = field(default_factory=BankCfg)
    dual_level: DualLevelCfg = field(default_factory=DualLevelCfg)
    mic: MICCfg = field(default_factory=MICCfg)


# ---------------------------------------------------------------------------- optimisation, run


@dataclass
class OptimCfg:
    # AdamW learning rate of the backbone (the head gets head_lr_mult times it).
    lr: float = 6e-5
    # AdamW betas.
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # AdamW epsilon.
    eps: float = 1e-8
    # AdamW weight decay (norm layers get norm_decay_mult times it).
    weight_decay: float = 0.01
    # Learning-rate multiplier of every parameter whose name contains 'head'.
    head_lr_mult: float = 10.0
    # Weight-decay multiplier of norm layers.
    norm_decay_mult: float = 0.0
    # Linear warm-up iterations (poly10warm).
    warmup_iters: int = 1500
    # The warm-up starts at lr * warmup_ratio.
    warmup_ratio: float = 1e-6
    # Poly decay power after the warm-up (1: linear to min_lr at max_iters).
    power: float = 1.0
    # Learning rate reached at max_iters.
    min_lr: float = 0.0
    # Clip the gradient norm to this; null: no clipping (the reference).
    grad_clip: Optional[float] = None
    # Layer-wise lr decay (BEiT): block i of L gets lr * layer_decay^(L + 1 - i), the patch embeddings
    # layer_decay^(L + 1); the pyramid, the final norm and the head are not decayed. 1: off. Needs a backbone
    # that numbers its layers (the foundation ViTs).
    layer_decay: float = 1.0


@dataclass
class TrainCfg:
    # Training iterations.
    max_iters: int = 40000
    # Write iter_N.pth every this many iterations (0: only at the end).
    checkpoint_interval: int = 1600
    # Evaluate on the validation split every this many iterations and at the end (0: never).
    eval_interval: int = 1600
    # Log averaged losses, time and memory every this many iterations.
    log_interval: int = 50
    # Write a debug image grid to run_dir/debug every this many iterations (0: never).
    debug_img_interval: int = 1000
    # Checkpoint files iter_N.pth kept (null: all); latest.pth always points at the newest.
    keep_last: Optional[int] = 1
    # Also keep the checkpoint of the best evaluation (mIoU) as best.pth (written when an evaluation improves).
    keep_best: bool = True
    # Skip an iteration whose gradients are NaN/inf instead of stopping with a message.
    skip_nonfinite: bool = False
    # Mixed precision of the forwards: off (float32), bf16 or fp16 (CUDA, with a gradient scaler).
    amp: Literal["off", "bf16", "fp16"] = "off"
    # Student and batches in channels-last memory layout.
    channels_last: bool = False
    # Several processes (torchrun): ddp wraps the student in DistributedDataParallel (gradients averaged during
    # the last backward of the step, overlapped with it); flat_allreduce averages them in one flat all-reduce
    # after all backward passes. Same result up to float rounding.
    distributed: Literal["ddp", "flat_allreduce"] = "ddp"
    # torch.compile the student, the EMA teacher and the terms' frozen models (same numbers up to float rounding).
    compile: bool = False
    # Its backend and mode (torch.compile's `backend`, `mode`): inductor generates fused kernels; aot_eager
    # traces without code generation (fast to build, for checks).
    compile_backend: str = "inductor"
    # torch.compile's mode; null: its default.
    compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = None


@dataclass
class EvalCfg:
    mode: Literal["whole", "slide"] = "whole"
    crop_size: list[int] = field(default_factory=lambda: [512, 512])
    stride: list[int] = field(default_factory=lambda: [341, 341])
    # Slide mode: all windows of an image through the model in one batch (the reference's `batched_slide`,
    # HRDA's test configuration): faster, more memory.
    batched_slide: bool = False
    # Evaluate on at most this many val images during training (None: all).
    max_images: Optional[int] = None


@dataclass
class RunCfg:
    # The run directory (config.yaml, train.log, metrics.jsonl, eval.jsonl, checkpoints, debug images).
    dir: str = "work_dirs/run"
    # Seed of the initialisation, data draws and augmentations (a run is reproducible from it).
    seed: int = 0
    # torch.use_deterministic_algorithms and cudnn deterministic (slower on a GPU).
    deterministic: bool = False
    # auto (a GPU when there is one), cpu, cuda or cuda:N.
    device: str = "auto"


@dataclass
class Config:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    uda: UDACfg = field(default_factory=UDACfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    run: RunCfg = field(default_factory=RunCfg)


# ---------------------------------------------------------------------------------------- loading


def preset_names() -> list[str]:
    """Names of the presets shipped as package data (without ``.yaml``; ``base`` excluded)."""
    files = resources.files("dida.configs")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml") and p.name != "base.yaml")


def _refuse_duplicate_keys(node: Any, source: str) -> None:
    """A key given twice in one mapping: YAML keeps the last silently, so the first value the user reads is
    not the one used. Refused, naming the key and both lines."""
    stack = [node] if node is not None else []
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        raise ConfigError(
                            f"{source}: key '{key.value}' is given twice in one section (lines {seen[key.value]} "
                            f"and {key.start_mark.line + 1}); YAML would keep only the last. Remove one of them."
                        )
                    seen[key.value] = key.start_mark.line + 1
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        # Aliases can expand without limit ("billion laughs") or refer to themselves: refuse them while
        # scanning the event stream, which is linear in the size of the text.
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(
                    f"{source}: YAML aliases (*{event.anchor}) are not accepted in config files, since they "
                    "can expand without limit. Write the values out, or start from another preset with "
                    "'inherit:'."
                )
        _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), source)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({e}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}.")
    return data


def _preset_text(name: str) -> str:
    return resources.files("dida.configs").joinpath(f"{name}.yaml").read_text()


def _read_text(path: Path) -> str:
    """A config file's text. Raises ``ConfigError`` for a file that is not UTF-8 text."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a YAML text file (byte {e.start} is not UTF-8). Give a preset or a "
                          "YAML config file.") from None


def resolve_config_source(name_or_path: str) -> tuple[str, str]:
    """Return ``(yaml_text, description)`` for a preset name, a YAML path, or a run directory."""
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.yaml").is_file():
        return _read_text(path / "config.yaml"), str(path / "config.yaml")
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not path.is_file():
            raise ConfigError(
                f"{name_or_path}: no such config file. Give a YAML path, a run directory with a "
                f"config.yaml, or one of the presets: {', '.join(preset_names())}."
            )
        return _read_text(path), str(path)
    if name_or_path in preset_names():
        return _preset_text(name_or_path), f"preset '{name_or_path}'"
    raise ConfigError(
        f"'{name_or_path}' is neither a preset nor an existing file. Presets: {', '.join(preset_names())}."
    )


# The former ``uda.method`` (dida < 0.2; run directories and checkpoints written then) as the keys that
# replaced it: self-training and the DIDA term on or off; source-only also had no feature distance.
_LEGACY_METHODS: dict[str, dict[str, Any]] = {
    "source_only": {"self_training": False, "feature_distance": {"enabled": False},
                    "dual_level": {"enabled": False}},
    "daformer": {"self_training": True, "dual_level": {"enabled": False}},
    "dida": {"self_training": True, "dual_level": {"enabled": True}},
}


def _translate_legacy(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Replace a legacy ``uda.method`` in one layer by the keys it stands for (explicit keys win)."""
    uda = data.get("uda")
    if not isinstance(uda, dict) or "method" not in uda:
        return data
    uda = dict(uda)
    method = uda.pop("method")
    if method not in _LEGACY_METHODS:
        raise ConfigError(f"{source}: uda.method must be one of {', '.join(_LEGACY_METHODS)} (it is replaced by "
                          f"uda.self_training and the terms' enabled keys), got {method!r}.")
    merged = OmegaConf.merge(OmegaConf.create(_LEGACY_METHODS[method]), OmegaConf.create(uda))
    return {**data, "uda": OmegaConf.to_container(merged)}


def _merge_layer(cfg: Any, data: dict[str, Any], source: str) -> Any:
    data = _translate_legacy(dict(data), source)
    # A preset may name another preset to start from, and describe itself in one line (--list-presets).
    data.pop("inherit", None)
    data.pop("description", None)
    try:
        return OmegaConf.merge(cfg, OmegaConf.create(data))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_omegaconf_message(e, _section_given_a_value(cfg, data))}") from None


def _omegaconf_message(e: OmegaConfBaseException, key: str | None = None) -> str:
    """One line for OmegaConf's error, with what to do: an unknown key, a missing value, a single value given
    to a section, a value of the wrong type. ``key``: the key at fault when OmegaConf does not say."""
    key = getattr(e, "full_key", None) or key
    msg = str(e).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        return f"unknown key '{key}'. Check the spelling against `dida train --help-config`."
    what = f"'{key}'" if key else "a key"
    if "is not a subclass of" in msg:
        return (f"{what} is a section, not a single value ({msg}); set its keys instead (e.g. {key or 'optim'}.KEY="
                "VALUE; every key: `dida train --help-config`).")
    if "is not Optional" in msg or "Incompatible value 'None'" in msg:
        return (f"{what} needs a value (it was empty or null, which it does not accept); give one, or leave the "
                "key out for its default (`dida train --help-config`).")
    hint = " (its type and allowed values: `dida train --help-config`)"
    return f"bad value for {what}: {msg}{hint}" if key else msg + hint


def _section_given_a_value(cfg: Any, data: dict[str, Any]) -> str | None:
    """The first top-level key of ``data`` that is a section of ``cfg`` but was given a single value."""
    for name, value in data.items():
        if isinstance(name, str) and not isinstance(value, dict) and name in cfg and \
                OmegaConf.is_dict(cfg[name]):
            return name
    return None


def _layers_for(text: str, source: str, seen: tuple[str, ...] = ()) -> list[tuple[dict[str, Any], str]]:
    data = _read_yaml(text, source)
    parent = data.get("inherit")
    layers: list[tuple[dict[str, Any], str]] = []
    if parent:
        if parent in seen:
            raise ConfigError(f"{source}: 'inherit' forms a cycle through '{parent}'.")
        ptext, psource = resolve_config_source(str(parent))
        layers += _layers_for(ptext, psource, seen + (str(parent),))
    layers.append((data, source))
    return layers


_SCHEMAS: dict[tuple[tuple[str, type], ...], type] = {}


def schema() -> type:
    """The ``Config`` dataclass, extended with the sections of terms registered from outside the package.

    Built-in sections are fields of ``UDACfg``; ``dida.uda.terms.register_term`` adds ``uda.<name>``.
    """
    from dida.uda.terms import extra_sections

    extra = tuple(sorted(extra_sections().items()))
    if not extra:
        return Config
    if extra not in _SCHEMAS:
        uda = dataclasses.make_dataclass(
            "UDACfg", [(name, cls, field(default_factory=cls)) for name, cls in extra], bases=(UDACfg,))
        _SCHEMAS[extra] = dataclasses.make_dataclass(
            "Config", [("uda", uda, field(default_factory=uda))], bases=(Config,))
    return _SCHEMAS[extra]


def _apply_override(cfg: Any, item: str) -> Any:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.max_iters=100).")
    key, value = item.split("=", 1)
    if key == "uda.method":  # legacy key (see _LEGACY_METHODS)
        data = _translate_legacy({"uda": {"method": yaml.safe_load(value)}}, f"override '{item}'")
        return OmegaConf.merge(cfg, OmegaConf.create(data))
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException as e:
        raise ConfigError(f"override '{item}': {_omegaconf_message(e, key.strip())}") from None
    except Exception as e:  # dotlist parse errors
        raise ConfigError(f"override '{item}' for '{key}' could not be parsed: {e}") from None


def load_config(name_or_path: Optional[str] = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated ``Config``: defaults, base.yaml, the preset/YAML (and what it inherits), overrides."""
    if name_or_path is None:
        return _load_layers([], overrides)
    text, source = resolve_config_source(name_or_path)
    return _load_layers(_layers_for(text, source), overrides)


def load_config_text(text: str, source: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """``load_config`` of YAML text held in memory (e.g. the resolved configuration saved in a checkpoint);
    ``source`` names it in error messages."""
    return _load_layers(_layers_for(text, source), overrides)


def _load_layers(layers: list[tuple[dict[str, Any], str]], overrides: list[str] | tuple[str, ...]) -> Config:
    cfg = OmegaConf.structured(schema())
    cfg = _merge_layer(cfg, _read_yaml(_preset_text("base"), "base.yaml"), "base.yaml")
    for data, src in layers:
        cfg = _merge_layer(cfg, data, src)
    for item in overrides:
        cfg = _apply_override(cfg, item)
    try:
        obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from None
    fill_default_roots(obj)
    validate(obj)
    return obj


def fill_default_roots(cfg: Config) -> None:
    """Empty dataset roots become ``$DIDA_DATA_ROOT/<dataset folder>`` (``data/<folder>`` when unset).

    This is the reference's ``data/gta``, ``data/synthia``, ``data/cityscapes`` layout, relative to the
    working directory unless ``DIDA_DATA_ROOT`` says otherwise (``dida.data.kinds.default_root``).
    """
    from dida.data.kinds import DATASET_KINDS, default_root

    for ds in (cfg.data.source, cfg.data.target, cfg.data.val):
        if not ds.root and ds.kind in DATASET_KINDS:
            ds.root = default_root(ds.kind) or ""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _check_names(cfg: Config) -> None:
    """Names that refer to the tables of backbones, segmentors and dataset kinds."""
    from dida.data.kinds import DATASET_KINDS
    from dida.models.registry import BACKBONES, SEGMENTORS

    _check(cfg.model.backbone in BACKBONES, "model.backbone",
           f"unknown backbone '{cfg.model.backbone}'; known: {', '.join(BACKBONES)}")
    _check(cfg.model.segmentor in SEGMENTORS, "model.segmentor",
           f"unknown segmentor '{cfg.model.segmentor}'; known: {', '.join(SEGMENTORS)}")
    for name in ("source", "target", "val"):
        kind = getattr(cfg.data, name).kind
        _check(kind in DATASET_KINDS, f"data.{name}.kind",
               f"unknown dataset kind '{kind}'; known: {', '.join(DATASET_KINDS)}")


def _check_mic(cfg: Config) -> None:
    m = cfg.uda.mic
    _check(m.block_size >= 1, "uda.mic.block_size", f"must be >= 1, got {m.block_size}")
    _check(0 <= m.ratio <= 1, "uda.mic.ratio", f"must be in [0, 1], got {m.ratio}")
    _check(m.mask_lambda >= 0, "uda.mic.mask_lambda", f"must be >= 0, got {m.mask_lambda}")
    _check(m.alpha is None or 0 <= m.alpha <= 1, "uda.mic.alpha", f"must be in [0, 1] or null, got {m.alpha}")
    _check(m.pseudo_threshold is None or 0 <= m.pseudo_threshold <= 1, "uda.mic.pseudo_threshold",
           f"must be in [0, 1] or null, got {m.pseudo_threshold}")
    if m.enabled:
        _check(cfg.uda.self_training or "src" in m.mode, "uda.mic.mode",
               f"{m.mode} masks target images with pseudo-labels, which needs uda.self_training=true; "
               "use separatesrc(aug) for a run without self-training")
        crops = [cfg.data.source.crop_size, cfg.data.target.crop_size]
        _check(all(2 * min(c) > m.block_size for c in crops), "uda.mic.block_size",
               f"{m.block_size}-px blocks do not fit the crops {crops} (round(side / block) would be 0)")


def _check_vit(v: ViTCfg) -> None:
    """``model.vit``: ranges here; bounds that depend on the variant's depth are checked by its builder."""
    idx = v.out_indices
    _check(idx is None or (len(idx) == 4 and idx == sorted(idx) and idx[0] >= 1),
           "model.vit.out_indices", f"four non-decreasing block numbers >= 1 (or null), got {idx}")
    _check(v.frozen_blocks >= 0, "model.vit.frozen_blocks", f"must be >= 0, got {v.frozen_blocks}")
    for key in ("hidden_size", "num_layers", "num_heads", "patch_size", "image_size"):
        value = getattr(v, key)
        _check(value is None or value >= 1, f"model.vit.{key}", f"must be >= 1 or null, got {value}")


def _check_pseudo_margins(cfg: Config) -> None:
    """HRDA's pseudo-label margins: target only, four sizes, never with the row ignoring (the reference asserts)."""
    d, u = cfg.data, cfg.uda
    for name in ("source", "val"):
        _check(getattr(d, name).pseudo_margins is None, f"data.{name}.pseudo_margins",
               "only the target's pseudo-labels have validity margins; set it to null (data.target.pseudo_margins)")
    margins = d.target.pseudo_margins
    if margins is None:
        return
    _check(len(margins) == 4 and min(margins) >= 0, "data.target.pseudo_margins",
           f"four sizes >= 0 [top, bottom, left, right], got {margins}")
    _check(u.pseudo_weight_ignore_top == 0 and u.pseudo_weight_ignore_bottom == 0, "data.target.pseudo_margins",
           f"the margins replace uda.pseudo_weight_ignore_top/bottom ({u.pseudo_weight_ignore_top}/"
           f"{u.pseudo_weight_ignore_bottom}) and the reference refuses both at once; set "
           "uda.pseudo_weight_ignore_top=0 uda.pseudo_weight_ignore_bottom=0, or data.target.pseudo_margins=null")


# ------------------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Range:
    """The legal values of a numeric key (each element of a list key): ``lo`` <= x <= ``hi`` (``<`` where
    open), and for a list, its exact length or at least one element."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    length: int | None = None
    nonempty: bool = False

    def ok(self, x: float) -> bool:
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def describe(self) -> str:
        def num(v: float) -> str:
            return f"{v:g}" if isinstance(v, float) else str(v)

        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        return f"{'<' if self.hi_open else '<='} {num(self.hi)}" if self.hi is not None else "finite"


# The largest image side the pipelines accept (img_scale, crops, windows): larger values are a typo that would
# resize every image to gigapixels.
MAX_IMAGE_SIDE = 16384
# A training crop (or HRDA's context crop) must hold at least one cell of the backbones' coarsest map (test images
# are padded to it instead, dida.models.inference.min_input_side); HRDA aligns its grids on the finest output
# stride (every registered backbone: maps at strides 4, 8, 16, 32).
MIN_MODEL_INPUT = 32
FINEST_STRIDE = 4

_UNIT = _Range(0, 1)
_POSITIVE_INT = _Range(1)
_NON_NEGATIVE = _Range(0)
_SIDES = _Range(1, MAX_IMAGE_SIDE, length=2)

# The legal range of every numeric key ("data.*" stands for data.source / data.target / data.val). Every float
# must also be finite. tests/test_config.py checks that each numeric key of the schema is listed here.
_RANGES: dict[str, _Range] = {
    "model.embed_dims": _Range(1, length=4), "model.num_heads": _Range(1, length=4),
    "model.depths": _Range(1, length=4), "model.drop_path_rate": _Range(0, 1, hi_open=True),
    "model.decoder_channels": _POSITIVE_INT, "model.aspp_dilations": _Range(1, nonempty=True),
    "model.dropout_ratio": _Range(0, 1, hi_open=True), "model.num_classes": _Range(1, 255),
    "model.hrda.scales": _Range(0, 1, lo_open=True, length=2), "model.hrda.detail_crop_size": _SIDES,
    "model.hrda.crop_divisor": _POSITIVE_INT, "model.hrda.hr_loss_weight": _UNIT,
    "model.hrda.lr_loss_weight": _UNIT, "model.hrda.attention_embed_dim": _POSITIVE_INT,
    "model.hrda.fixed_attention": _UNIT,
    "model.vit.out_indices": _Range(1, length=4), "model.vit.frozen_blocks": _NON_NEGATIVE,
    "model.vit.hidden_size": _POSITIVE_INT, "model.vit.num_layers": _POSITIVE_INT,
    "model.vit.num_heads": _POSITIVE_INT, "model.vit.patch_size": _POSITIVE_INT,
    "model.vit.image_size": _POSITIVE_INT,
    "data.*.img_scale": _SIDES, "data.*.crop_size": _SIDES, "data.*.cat_max_ratio": _Range(0, 1, lo_open=True),
    "data.*.flip_prob": _UNIT, "data.*.pseudo_margins": _Range(0, length=4),
    "data.rcs.temperature": _Range(0, lo_open=True), "data.rcs.min_pixels": _NON_NEGATIVE,
    "data.rcs.min_crop_ratio": _NON_NEGATIVE,
    "data.batch_size": _POSITIVE_INT, "data.num_workers": _Range(0, 256), "data.max_bad_samples": _NON_NEGATIVE,
    "uda.pseudo_threshold": _UNIT, "uda.pseudo_weight_ignore_top": _NON_NEGATIVE,
    "uda.pseudo_weight_ignore_bottom": _NON_NEGATIVE, "uda.ema.alpha": _UNIT,
    "uda.feature_distance.weight": _NON_NEGATIVE, "uda.feature_distance.classes": _NON_NEGATIVE,
    "uda.feature_distance.scale_min_ratio": _UNIT,
    "uda.augment.color_jitter_strength": _UNIT, "uda.augment.color_jitter_prob": _UNIT,
    "uda.bank.size": _POSITIVE_INT, "uda.bank.momentum": _UNIT, "uda.bank.update_interval": _POSITIVE_INT,
    "uda.dual_level.instance_weight": _NON_NEGATIVE, "uda.dual_level.a_smooth": _UNIT,
    "uda.dual_level.chunk_rows": _NON_NEGATIVE,
    "uda.mic.block_size": _POSITIVE_INT, "uda.mic.ratio": _UNIT, "uda.mic.mask_lambda": _NON_NEGATIVE,
    "uda.mic.alpha": _UNIT, "uda.mic.pseudo_threshold": _UNIT,
    "optim.lr": _Range(0, lo_open=True), "optim.betas": _Range(0, 1, hi_open=True, length=2),
    "optim.eps": _Range(0, lo_open=True), "optim.weight_decay": _NON_NEGATIVE, "optim.head_lr_mult": _NON_NEGATIVE,
    "optim.norm_decay_mult": _NON_NEGATIVE, "optim.warmup_iters": _NON_NEGATIVE,
    "optim.warmup_ratio": _Range(0, 1, lo_open=True), "optim.power": _NON_NEGATIVE, "optim.min_lr": _NON_NEGATIVE,
    "optim.grad_clip": _Range(0, lo_open=True), "optim.layer_decay": _Range(0, 1, lo_open=True),
    "train.max_iters": _NON_NEGATIVE, "train.checkpoint_interval": _NON_NEGATIVE,
    "train.eval_interval": _NON_NEGATIVE, "train.log_interval": _NON_NEGATIVE,
    "train.debug_img_interval": _NON_NEGATIVE, "train.keep_last": _POSITIVE_INT,
    "eval.crop_size": _SIDES, "eval.stride": _Range(1, MAX_IMAGE_SIDE, length=2), "eval.max_images": _POSITIVE_INT,
    "run.seed": _Range(0, 2**63 - 1),
}
# Notes on keys whose message needs more than the range.
_RANGE_HINTS = {
    "optim.grad_clip": " (null: no clipping)", "train.keep_last": " (null: keep all)",
    "eval.max_images": " (null: all)", "train.checkpoint_interval": " (0 disables it)",
    "train.eval_interval": " (0 disables it)", "train.log_interval": " (0 disables it)",
    "train.debug_img_interval": " (0 disables it)", "model.num_classes": " (255 is the ignore label)",
    "run.seed": " (numpy's generators take non-negative seeds)",
}


def _range_key(path: str) -> str:
    parts = path.split(".")
    if len(parts) == 3 and parts[0] == "data" and parts[1] in ("source", "target", "val"):
        return f"data.*.{parts[2]}"
    return path


def _check_numbers(obj: Any, prefix: str = "") -> None:
    """Every number of the configuration: finite, and within its key's ``_RANGES`` entry."""
    import math

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_numbers(value, key + ".")
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        numbers = [x for x in items if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if not numbers and not (isinstance(value, (list, tuple)) and _range_key(key) in _RANGES):
            continue
        if any(isinstance(x, float) and not math.isfinite(x) for x in numbers):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        spec = _RANGES.get(_range_key(key))
        if spec is None:  # a section registered from outside the package: finiteness only
            continue
        hint = _RANGE_HINTS.get(key, "")
        if isinstance(value, (list, tuple)):
            if spec.length is not None and len(value) != spec.length:
                raise ConfigError(f"{key}: needs {spec.length} values, each {spec.describe()}; got {value}")
            if spec.nonempty and not value:
                raise ConfigError(f"{key}: needs at least one value {spec.describe()}; got {value}")
            bad = [x for x in numbers if not spec.ok(x)]
            if bad:
                raise ConfigError(f"{key}: each value must be {spec.describe()}{hint}, got {value}")
        elif not spec.ok(value):
            raise ConfigError(f"{key}: must be {spec.describe()}{hint}, got {value}")


_DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def _check_relations(cfg: Config) -> None:
    """Keys that are legal alone but not together (the range of each key is ``_check_numbers``'s)."""
    o, d, u, e, m = cfg.optim, cfg.data, cfg.uda, cfg.eval, cfg.model
    _check(o.min_lr <= o.lr, "optim.min_lr", f"must be <= optim.lr ({o.lr:g}): the poly schedule decays from lr "
                                             f"to min_lr, got {o.min_lr:g}")
    _check(all(s <= c for s, c in zip(e.stride, e.crop_size)), "eval.stride",
           f"{list(e.stride)} is larger than the window eval.crop_size {list(e.crop_size)}: the pixels between two "
           "windows would never be predicted (class 0). Use a stride <= the window (the reference: 2/3 of it)")
    _check(bool(cfg.run.dir.strip()), "run.dir", "must name a folder (the run's config, logs and checkpoints)")
    if cfg.train.compile:
        from torch._dynamo import list_backends

        known = list_backends(exclude_tags=())
        _check(cfg.train.compile_backend in known, "train.compile_backend",
               f"unknown torch.compile backend '{cfg.train.compile_backend}'; known: {', '.join(known)}")
    _check(bool(_DEVICE_NAME.match(cfg.run.device)), "run.device",
           f"'{cfg.run.device}' is not a device name; use auto, cpu, cuda, cuda:N or mps")
    if m.embed_dims is not None and m.num_heads is not None:
        _check(all(dim % h == 0 for dim, h in zip(m.embed_dims, m.num_heads)), "model.num_heads",
               f"each stage width (model.embed_dims {m.embed_dims}) must be a multiple of its heads, got {m.num_heads}")
    if u.self_training:
        top, bottom, height = u.pseudo_weight_ignore_top, u.pseudo_weight_ignore_bottom, d.target.crop_size[0]
        _check(top + bottom < height, "uda.pseudo_weight_ignore_top",
               f"with uda.pseudo_weight_ignore_bottom ({top} + {bottom} rows) it covers the whole target crop "
               f"height {height}: no target pixel would get a pseudo-label weight")
    context = min(m.hrda.scales) if m.segmentor == "hrda" and m.hrda.scales else 1.0
    smallest = math.ceil(MIN_MODEL_INPUT / context)
    for name in ("source", "target"):
        crop = getattr(d, name).crop_size
        _check(min(crop) >= smallest, f"data.{name}.crop_size",
               f"{list(crop)} is too small for the model: its coarsest feature map (stride {MIN_MODEL_INPUT}"
               + (f", after HRDA's context scale {context:g}" if context != 1 else "") + f") needs crops of at "
               f"least {smallest}x{smallest}")
    if e.mode == "slide":
        _check(min(e.crop_size) >= MIN_MODEL_INPUT, "eval.crop_size",
               f"{list(e.crop_size)}: slide windows must be at least {MIN_MODEL_INPUT}x{MIN_MODEL_INPUT} px for the model")
    if m.segmentor == "hrda":
        _check_hrda_crops(cfg, context)


def _check_hrda_crops(cfg: Config, context: float) -> None:
    """HRDA's training crops: multiples of one context cell, each holding the detail crop."""
    h = cfg.model.hrda
    cell = FINEST_STRIDE / context
    if cell != int(cell):
        return  # the model's own check names model.hrda.scales
    for name in ("source", "target"):
        crop = getattr(cfg.data, name).crop_size
        _check(all(c % int(cell) == 0 for c in crop), f"data.{name}.crop_size",
               f"{list(crop)}: HRDA needs crops that are multiples of {int(cell)} (output stride {FINEST_STRIDE} / "
               f"context scale {context:g}), so that the context and detail grids align")
        if h.detail_crop_size is not None:
            _check(all(dc <= c for dc, c in zip(h.detail_crop_size, crop)), "model.hrda.detail_crop_size",
                   f"{list(h.detail_crop_size)} is larger than the data.{name}.crop_size {list(crop)} it is cut from")


def validate(cfg: Config) -> None:
    """Every key's legal range (``_RANGES``: finite numbers within bounds) and the relations between keys.
    Raises ``ConfigError`` naming the key."""
    _check_names(cfg)
    _check_numbers(cfg)
    o, u, d = cfg.optim, cfg.uda, cfg.data
    _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two values in [0, 1)")
    _check_mic(cfg)
    _check_pseudo_margins(cfg)
    _check(all(0 <= c < cfg.model.num_classes for c in u.feature_distance.classes),
           "uda.feature_distance.classes", f"class ids must be in [0, {cfg.model.num_classes})")
    _check_vit(cfg.model.vit)
    for name in ("source", "target", "val"):
        ds: DatasetCfg = getattr(d, name)
        key = f"data.{name}"
        _check(bool(ds.root), f"{key}.root", f"a {ds.kind} dataset needs a root")
        if name != "val":
            # A keep-ratio resize makes the short side at most min(img_scale): a crop larger than that
            # would always be padded, which is almost surely a mistake.
            _check(max(ds.crop_size) <= max(ds.img_scale) and min(ds.crop_size) <= min(ds.img_scale),
                   f"{key}.crop_size", f"{list(ds.crop_size)} is larger than the image scale {list(ds.img_scale)}")
    _check_relations(cfg)


def to_yaml(cfg: Config) -> str:
    """The resolved configuration as YAML text (written to ``run_dir/config.yaml``)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def preset_descriptions() -> dict[str, str]:
    """Each preset's one-line ``description`` (empty when it has none), for ``dida train --list-presets``."""
    out = {}
    for name in preset_names():
        data = _read_yaml(_preset_text(name), f"preset '{name}'")
        out[name] = str(data.get("description", "")).strip()
    return out


def _field_comments(cls: type) -> dict[str, str]:
    """The comment of each field of a config dataclass: the comment lines right above it and its trailing one
    (from the class that declares the field; classes made at run time, e.g. ``schema()``'s, have no source)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_field_comments(klass))
    return out


def _own_field_comments(cls: type) -> dict[str, str]:
    import inspect
    import io
    import tokenize

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    trailing: dict[int, str] = {}
    full_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (full_line if tok.line.strip().startswith("#") else trailing)[tok.start[0]] = text
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    above: list[str] = []
    for number, line in enumerate(source.splitlines(), start=1):
        if number in full_line:
            above.append(full_line[number])
            continue
        name = line.strip().split(":", 1)[0].strip()
        if name in names and ":" in line:
            out[name] = " ".join([*above, trailing.get(number, "")]).strip()
        above = []
    return out


def _allowed(tp: Any) -> str:
    """The allowed values of a field's type, for the help text."""
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return f"{_allowed(inner[0]) if len(inner) == 1 else 'value'} | null"
    if tp is bool:
        return "true | false"
    if origin is list:
        return f"list of {getattr(args[0], '__name__', 'values')}" if args else "list"
    return getattr(tp, "__name__", str(tp))


def _table_names(cls: type, name: str) -> str | None:
    """Fields whose values are entries of a table: the table's names."""
    if cls is ModelCfg and name in ("segmentor", "backbone"):
        from dida.models.registry import BACKBONES, SEGMENTORS

        return " | ".join(SEGMENTORS if name == "segmentor" else BACKBONES)
    if cls is DatasetCfg and name == "kind":
        from dida.data.kinds import DATASET_KINDS

        return " | ".join(DATASET_KINDS)
    return None


def _describe(cls: type, obj: Any, indent: int, lines: list[str]) -> None:
    import typing

    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        pad = "  " * indent
        if dataclasses.is_dataclass(value):
            doc = (type(value).__doc__ or "").strip().splitlines()
            lines.append(f"{pad}{f.name}:" + (f"  # {doc[0]}" if doc else ""))
            _describe(type(value), value, indent + 1, lines)
            continue
        shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        note = comments.get(f.name, "")
        allowed = _table_names(cls, f.name) or _allowed(hints[f.name])
        lines.append(f"{pad}{f.name}: {shown}  # [{allowed}] {note}".rstrip())


def describe_schema() -> str:
    """Every key with its default, allowed values and a description, for ``dida train --help-config``."""
    cfg = load_config()
    lines = ["# Every configuration key: default  # [allowed values] description. Set any key on the command line",
             "# as section.key=value (e.g. train.max_iters=1000) or in a YAML file that may `inherit:` a preset.",
             "# Qn names the reference implementation's quirk n (the quirk tables of docs/design.md)."]
    _describe(type(cfg), cfg, 0, lines)
    return "\n".join(lines)

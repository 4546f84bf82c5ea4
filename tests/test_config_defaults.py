"""Every default of the configuration, and every reference preset, pinned against the spec.

The spec is ``../shared/spec/method.md`` (DAFormer ``e6f6e04`` / DIDA ``8b9c5bf``, experiments 7 and 8);
each group below quotes the section it comes from. Keys that the spec does not cover (engineering
settings) or that deliberately differ from the reference (documented in ``docs/design.md``) are pinned
too and marked "dida's choice" / "deliberate". ``test_every_key_is_pinned`` makes sure that a new key
cannot be added without a pin here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from dida.config import load_config, preset_names
from dida.models.mit import MIT_VARIANTS


def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A config dataclass as ``{"dotted.key": value}`` (lists kept as values)."""
    out: dict[str, Any] = {}
    for key, value in (dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj).items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.fixture
def no_data_root_env(monkeypatch):
    # Empty roots are filled from $DIDA_DATA_ROOT; unset, they are the reference's data/<dataset>.
    monkeypatch.delenv("DIDA_DATA_ROOT", raising=False)


# ------------------------------------------------------------------------------------- the defaults

MODEL = {
    # 1.1: "Segmentor = MiT backbone (SegFormer encoder) + DAFormer decode head ('sepaspp' fusion)",
    # "b5 (used)". embed_dims / num_heads / depths None = the variant's own (pinned below).
    "model.segmentor": "encoder_decoder",
    "model.backbone": "mit_b5",
    "model.embed_dims": None,
    "model.num_heads": None,
    "model.depths": None,
    # 1.2: "Stochastic depth: drop_path_rate = 0.1 (constructor default; no config overrides it)."
    "model.drop_path_rate": 0.1,
    # 1.3: "channels=256, dropout_ratio=0.1, num_classes=19 ... dilations=(1,6,12,18)".
    "model.decoder_channels": 256,
    "model.aspp_dilations": [1, 6, 12, 18],
    "model.dropout_ratio": 0.1,
    "model.num_classes": 19,
    # dida's choice: no weights by default (the reference presets set pretrained/mit_b5.pth, 1.2 (a)).
    "model.pretrained": None,
}
MODEL_HRDA = {
    # hrda_mic.md 1.1 (the MIC(HRDA) preset values), read only when model.segmentor == "hrda": scales [0.5, 1]
    # (sorted, Q3), detail crop 512x512, divisor 8, hr_loss_weight 0.1, lr_loss_weight 0, class-wise attention of
    # width 256, learned (fixed_attention None), HR slide inference with overlap, no blur_hr_crop; Q1 kept.
    "model.hrda.scales": [0.5, 1.0],
    "model.hrda.detail_crop_size": [512, 512],
    "model.hrda.crop_divisor": 8,
    "model.hrda.allow_last_offset": False,
    "model.hrda.hr_loss_weight": 0.1,
    "model.hrda.lr_loss_weight": 0.0,
    "model.hrda.attention_classwise": True,
    "model.hrda.attention_embed_dim": 256,
    "model.hrda.fixed_attention": None,
    "model.hrda.slide_inference": True,
    "model.hrda.slide_overlap": True,
    "model.hrda.blur_detail": False,
    # dida's choice: activation checkpointing off (a memory option, same numbers).
    "model.hrda.checkpoint_backbone": False,
}
MODEL_VIT = {
    # dida's choices (foundation ViT backbones, not in the spec), read only for dinov2_* / dinov3_*: the named
    # variant as published, four evenly spaced blocks into the pyramid, nothing frozen.
    "model.vit.out_indices": None,
    "model.vit.frozen_blocks": 0,
    "model.vit.hidden_size": None,
    "model.vit.num_layers": None,
    "model.vit.num_heads": None,
    "model.vit.patch_size": None,
    "model.vit.image_size": None,
}

# Spec 2.5 pipelines / 2.4 numerics / 2.1 layouts and suffixes, per dataset.
DATA_SOURCE = {
    # 2.5: "GTA source: Load -> LoadAnn -> Resize(1280,720) -> RandomCrop(512, cat_max_ratio 0.75) ->
    # Flip(0.5)". 2.1: GTA "Dataset suffixes: img .png, seg _labelTrainIds.png"; root data/gta.
    "data.source.kind": "gta",
    "data.source.root": "data/gta",
    "data.source.split": "train",
    "data.source.img_scale": [1280, 720],
    "data.source.crop_size": [512, 512],
    "data.source.cat_max_ratio": 0.75,
    "data.source.flip_prob": 0.5,
    # Only read by kind == "folder" (dida's generic dataset); the suffixes are GTA's (2.1).
    "data.source.img_dir": "images",
    "data.source.label_dir": "labels",
    "data.source.img_suffix": ".png",
    "data.source.label_suffix": "_labelTrainIds.png",
    # Off (DAFormer/DIDA have no margins, method.md 2.5); hrda_mic.md 2.3 "plcrop v2" sets them on the HRDA
    # presets' target. Canvas: the reference's hard-coded 1024x2048 (quirk Q17 kept).
    "data.source.pseudo_margins": None,
    "data.source.pseudo_margins_canvas": "reference",
}
DATA_TARGET = {
    # 2.5: "Cityscapes target (train): Load -> LoadAnn -> Resize(1024,512) -> RandomCrop(512, cat_max_ratio
    # 1.0, i.e. a single draw) -> Flip(0.5)"; 2.1: data/cityscapes, leftImg8bit/train.
    "data.target.kind": "cityscapes",
    "data.target.root": "data/cityscapes",
    "data.target.split": "train",
    "data.target.img_scale": [1024, 512],
    "data.target.crop_size": [512, 512],
    "data.target.cat_max_ratio": 1.0,
    "data.target.flip_prob": 0.5,
    "data.target.img_dir": "images",
    "data.target.label_dir": "labels",
    "data.target.img_suffix": ".png",
    "data.target.label_suffix": "_labelTrainIds.png",
    "data.target.pseudo_margins": None,
    "data.target.pseudo_margins_canvas": "reference",
}
DATA_VAL = {
    # 2.5: "Test/val (Cityscapes val): Load -> MultiScaleFlipAug(img_scale (1024,512), flip=False ...)".
    # crop_size / cat_max_ratio are not used by the test pipeline (no crop).
    "data.val.kind": "cityscapes",
    "data.val.root": "data/cityscapes",
    "data.val.split": "val",
    "data.val.img_scale": [1024, 512],
    "data.val.crop_size": [512, 512],
    "data.val.cat_max_ratio": 1.0,
    "data.val.flip_prob": 0.0,
    "data.val.img_dir": "images",
    "data.val.label_dir": "labels",
    "data.val.img_suffix": ".png",
    "data.val.label_suffix": "_labelTrainIds.png",
    "data.val.pseudo_margins": None,
    "data.val.pseudo_margins_canvas": "reference",
}
DATA_RCS = {
    # 3: "rare_class_sampling = dict(min_pixels=3000, class_temp=0.01, min_crop_ratio=0.5), for both
    # experiments"; statistics read from the source root (3.1), hence no stats_dir.
    "data.rcs.enabled": True,
    "data.rcs.temperature": 0.01,
    "data.rcs.min_pixels": 3000,
    "data.rcs.min_crop_ratio": 0.5,
    "data.rcs.stats_dir": None,
}
DATA_LOADER = {
    # 2.5: "Dataloader: batch 2 (samples_per_gpu), 4 workers"; 7: "Batch: 2 source + 2 target".
    "data.batch_size": 2,
    "data.num_workers": 4,
    # dida's choices (no effect on values): pinned host memory; corrupt-sample budget (docs/reliability.md).
    "data.pin_memory": True,
    "data.max_bad_samples": 20,
}
UDA = {
    # 4 (table): "alpha (EMA) 0.999, pseudo_threshold 0.968, pseudo_weight_ignore_top 15,
    # pseudo_weight_ignore_bottom 120"; 6.8: DAFormer's self-training runs (DIDA adds a term to it).
    "uda.self_training": True,
    "uda.pseudo_threshold": 0.968,
    "uda.pseudo_weight_ignore_top": 15,
    "uda.pseudo_weight_ignore_bottom": 120,
    # 4.3: "classes = unique(ALL source labels of the whole batch). This includes 255" (kept quirk).
    "uda.mix_classes": "batch_union",
}
UDA_EMA = {
    # 4.1: "alpha_t = min(1 - 1/(t+1), 0.999)"; "The teacher runs in train mode" (BN on target-batch
    # statistics); "Only parameters() are copied, not BN buffers."
    "uda.ema.alpha": 0.999,
    "uda.ema.teacher_bn_eval": False,
    "uda.ema.update_buffers": False,
}
UDA_FEATURE_DISTANCE = {
    # 4 (table) / 5: "imnet_feature_dist_lambda 0.005, imnet_feature_dist_classes [6,7,11,12,13,14,15,16,
    # 17,18], imnet_feature_dist_scale_min_ratio 0.75".
    "uda.feature_distance.enabled": True,
    "uda.feature_distance.weight": 0.005,
    "uda.feature_distance.classes": [6, 7, 11, 12, 13, 14, 15, 16, 17, 18],
    "uda.feature_distance.scale_min_ratio": 0.75,
    # DELIBERATE non-reference default (docs/design.md, "Reference quirks"): 5 says "If no cell is masked,
    # the mean of an empty tensor is NaN"; dida logs 0 unless empty_mask=nan.
    "uda.feature_distance.empty_mask": "zero",
}
UDA_AUGMENT = {
    # 4 (table) / 4.4: "blur True, color_jitter_strength (s) 0.2, color_jitter_probability (p) 0.2".
    "uda.augment.color_jitter_strength": 0.2,
    "uda.augment.color_jitter_prob": 0.2,
    "uda.augment.blur": True,
}
UDA_BANK = {
    # 6.2: the bank is "Loaded once in __init__" from the shipped npz files (no default path: the presets
    # name the reference's files); 6.1: "buffer_size K 300", "update_interval 50", "momentum (bank EMA)
    # 0.999"; 6.3: positions over the whole batch, features of image 0; absent classes decay (kept quirks).
    "uda.bank.init": "from_file",
    "uda.bank.features_path": None,
    "uda.bank.labels_path": None,
    "uda.bank.size": 300,
    "uda.bank.momentum": 0.999,
    "uda.bank.update_interval": 50,
    "uda.bank.class_mean": "reference",
    "uda.bank.absent_classes": "decay",
}
UDA_DUAL_LEVEL = {
    # Off by default: the default method is DAFormer (the *_dida presets switch it on).
    "uda.dual_level.enabled": False,
    # 6.1: "ins_lambda 0.5", "if_calibrate 1", "a_smooth 1"; 6.4: the weak target view "is a no-op".
    "uda.dual_level.instance_weight": 0.5,
    "uda.dual_level.calibrate": True,
    "uda.dual_level.a_smooth": 1.0,
    "uda.dual_level.weak_augment": False,
    # dida's choice (same values, bounded memory; docs/design.md and ../shared/hints.md).
    "uda.dual_level.chunk_rows": 64,
}
UDA_MIC = {
    # Off by default; the *_mic_* presets switch it on. hrda_mic.md 4.1-4.6, the MIC(HRDA) values: mode
    # separatetrgaug, mask_ratio 0.7, mask_block_size 64 (32 for MIC(DAFormer), set by its presets), 'same'
    # teacher ('same'/'same' -> null/null and the confidence weight on), blur gate and sigma as the code does
    # (Q13), mask_lambda scoping only the fused term (Q12).
    "uda.mic.enabled": False,
    "uda.mic.mode": "separatetrgaug",
    "uda.mic.block_size": 64,
    "uda.mic.ratio": 0.7,
    # dida's choice (Q12): 1, the value of every MIC preset, instead of the base config's 0 that would drop
    # the fused term.
    "uda.mic.mask_lambda": 1.0,
    "uda.mic.lambda_scope": "seg_only",
    "uda.mic.blur_gate": "always",
    "uda.mic.blur_sigma": "per_batch",
    "uda.mic.alpha": None,
    "uda.mic.pseudo_threshold": None,
    "uda.mic.confidence_weight": True,
}
OPTIM = {
    # 7: "AdamW, lr 6e-5, betas (0.9, 0.999), eps 1e-8 (default), weight_decay 0.01"; "head: lr x10";
    # "norm: decay x0"; "poly(t) = b(1 - t/40000)^1.0, min_lr 0"; "t < 1500 (linear warmup, warmup_ratio
    # 1e-6)"; 4.6: "No gradient clipping".
    "optim.lr": 6e-5,
    "optim.betas": [0.9, 0.999],
    "optim.eps": 1e-8,
    "optim.weight_decay": 0.01,
    "optim.head_lr_mult": 10.0,
    "optim.norm_decay_mult": 0.0,
    "optim.warmup_iters": 1500,
    "optim.warmup_ratio": 1e-6,
    "optim.power": 1.0,
    "optim.min_lr": 0.0,
    "optim.grad_clip": None,
    # dida's choice (foundation backbones, not in the spec): no layer-wise lr decay, the reference's groups.
    "optim.layer_decay": 1.0,
}
TRAIN = {
    # 7: "Iterations: 40,000"; "Checkpoints every iters//25 = 1600 iterations"; "Evaluation on CS val
    # (mIoU) every 1600 iterations"; "Logging: TextLogger every 50 iterations".
    "train.max_iters": 40000,
    "train.checkpoint_interval": 1600,
    "train.eval_interval": 1600,
    "train.log_interval": 50,
    # 4 (table): "debug_img_interval 1000".
    "train.debug_img_interval": 1000,
    # dida's choice: keep the latest checkpoint and the best by mIoU (25 x 1.7 GB for MiT-B5 does not fit
    # most disks). 7: the reference's "max_keep_ckpts 50" keeps all 25: train.keep_last=null (see
    # test_keep_last_null_keeps_what_the_reference_keeps).
    "train.keep_last": 1,
    "train.keep_best": True,
    # dida's choice: stop on a non-finite loss with a message (the reference trains on with NaNs).
    "train.skip_nonfinite": False,
    # 4.6: "no fp16"; plain layouts and eager mode (dida's performance options, off).
    "train.amp": "off",
    "train.channels_last": False,
    "train.distributed": "ddp",
    "train.compile": False,
    "train.compile_backend": "inductor",
    "train.compile_mode": None,
}
EVAL = {
    # 8: "test_cfg.mode='whole'"; all 500 val images. Slide crop/stride are dida's choices: "Slide
    # inference exists but is unused" in the reference, which gives no values.
    "eval.mode": "whole",
    "eval.crop_size": [512, 512],
    "eval.stride": [341, 341],
    "eval.max_images": None,
    # Off: method.md 8 runs whole images; hrda_mic.md 1.7 (HRDA's test_cfg batched_slide=True) is set by the
    # HRDA presets.
    "eval.batched_slide": False,
}
RUN = {
    # 7: "exp 7 (GTA->CS): seed 0"; "set_random_seed ... with deterministic=False".
    "run.seed": 0,
    "run.deterministic": False,
    # dida's choices: output directory and device selection.
    "run.dir": "work_dirs/run",
    "run.device": "auto",
}

GROUPS: dict[str, dict[str, Any]] = {
    "model": MODEL, "model.hrda": MODEL_HRDA, "model.vit": MODEL_VIT, "data.source": DATA_SOURCE, "data.target": DATA_TARGET, "data.val": DATA_VAL,
    "data.rcs": DATA_RCS, "data.loader": DATA_LOADER, "uda": UDA, "uda.ema": UDA_EMA,
    "uda.feature_distance": UDA_FEATURE_DISTANCE, "uda.augment": UDA_AUGMENT, "uda.bank": UDA_BANK,
    "uda.dual_level": UDA_DUAL_LEVEL, "uda.mic": UDA_MIC, "optim": OPTIM, "train": TRAIN, "eval": EVAL, "run": RUN,
}
ALL_DEFAULTS = {k: v for group in GROUPS.values() for k, v in group.items()}


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b  # 1 != 1.0 != True here: types are part of the pin


def test_every_key_is_pinned(no_data_root_env):
    keys = set(flat(load_config()))
    assert keys - set(ALL_DEFAULTS) == set(), "new config keys: pin their defaults against the spec here"
    assert set(ALL_DEFAULTS) - keys == set(), "pinned keys that the config no longer has"


@pytest.mark.parametrize("group", list(GROUPS))
def test_defaults_match_the_spec(group, no_data_root_env):
    got = flat(load_config())
    wrong = {k: (got.get(k), v) for k, v in GROUPS[group].items() if not _same(got.get(k), v)}
    assert wrong == {}, "key: (config, spec)"


def test_default_backbone_is_mit_b5_as_the_spec_tabulates():
    # 1.2: "b5 (used) | 64,128,320,512 | 1,2,5,8 | 3,6,40,3", "sr_ratios [8,4,2,1]", "mlp_ratio 4".
    b5 = MIT_VARIANTS[load_config().model.backbone]
    assert b5.embed_dims == (64, 128, 320, 512)
    assert b5.num_heads == (1, 2, 5, 8)
    assert b5.depths == (3, 6, 40, 3)
    assert b5.sr_ratios == (8, 4, 2, 1) and b5.mlp_ratio == 4


REFERENCE_MAX_KEEP_CKPTS = 50


def test_keep_last_null_keeps_what_the_reference_keeps():
    t = load_config(None, ["train.keep_last=null"]).train
    # 7: checkpoints every 1600 of 40000 iterations (25 of them) with max_keep_ckpts 50: none is deleted.
    assert t.max_iters // t.checkpoint_interval <= REFERENCE_MAX_KEEP_CKPTS and t.keep_last is None


# ----------------------------------------------------------------------------------- the presets

PRETRAINED = "pretrained/mit_b5.pth"  # 1.2 (a): "Official SegFormer ImageNet checkpoint pretrained/mit_b5.pth"
GTA_BANK = "embedding_cache/balanced avg cache 300/"  # 6.2: "dataset=0 with K=300"
SYNTHIA_BANK = "embedding_cache/Synthia2cs cache 300/"  # 6.2: "dataset=1 -> ./embedding_cache/Synthia2cs cache 300/"

# Each preset's full difference from the defaults: every other key keeps its pinned default above
# (40k iterations, batch 2+2, 512x512 crops, RCS, AdamW/poly10warm, eval/checkpoint every 1600, ...).
PRESET_DELTAS: dict[str, dict[str, Any]] = {
    # 7: exp 7, GTA -> CS, seed 0; DAFormer = self-training + feature distance, no instance term.
    "gta2cs_daformer": {
        "model.pretrained": PRETRAINED,
        "run.dir": "work_dirs/gta2cs_daformer",
    },
    # 6.8: "Student loss = DAFormer losses + 0.5 L_in" with the bank of 6.2. DELIBERATE: the GTA bank
    # ("balanced avg cache 300"), where the shipped code loads the SYNTHIA bank for GTA too (6.2, 6.10.2;
    # docs/design.md).
    "gta2cs_dida": {
        "model.pretrained": PRETRAINED,
        "uda.dual_level.enabled": True,
        "uda.bank.features_path": GTA_BANK + "f_buffer_s.npz",
        "uda.bank.labels_path": GTA_BANK + "l_buffer_s.npz",
        "run.dir": "work_dirs/gta2cs_dida",
    },
    # 7: "exp 8 (SYNTHIA->CS): seed 2"; 2.5: "SYNTHIA source: the same, with Resize(1280,760)".
    "synthia2cs_daformer": {
        "model.pretrained": PRETRAINED,
        "data.source.kind": "synthia",
        "data.source.root": "data/synthia",
        "data.source.img_scale": [1280, 760],
        "run.seed": 2,
        "run.dir": "work_dirs/synthia2cs_daformer",
    },
    "synthia2cs_dida": {
        "model.pretrained": PRETRAINED,
        "data.source.kind": "synthia",
        "data.source.root": "data/synthia",
        "data.source.img_scale": [1280, 760],
        "uda.dual_level.enabled": True,
        "uda.bank.features_path": SYNTHIA_BANK + "f_buffer_s.npz",
        "uda.bank.labels_path": SYNTHIA_BANK + "l_buffer_s.npz",
        "run.seed": 2,
        "run.dir": "work_dirs/synthia2cs_dida",
    },
    # Not in the spec (dida's baseline, documented in the preset): gta2cs_daformer without any target
    # term: no self-training, no feature distance.
    "gta2cs_source_only": {
        "model.pretrained": PRETRAINED,
        "uda.self_training": False,
        "uda.feature_distance.enabled": False,
        "run.dir": "work_dirs/gta2cs_source_only",
    },
}


def test_the_reference_presets_exist():
    assert set(PRESET_DELTAS) <= set(preset_names())


@pytest.mark.parametrize("name", list(PRESET_DELTAS))
def test_preset_differs_from_the_defaults_exactly_as_pinned(name, no_data_root_env):
    defaults, preset = flat(load_config()), flat(load_config(name))
    delta = {k: v for k, v in preset.items() if not _same(v, defaults[k])}
    assert delta == PRESET_DELTAS[name]
    for k, v in PRESET_DELTAS[name].items():
        assert _same(preset[k], v), k


# The experiment settings of the spec, field by field (2.5, 3, 4, 6, 7).
SOURCE_SCALE = {"gta": [1280, 720], "synthia": [1280, 760]}  # 2.5
SEED = {"gta": 0, "synthia": 2}  # 7
METHOD = {  # (self_training, feature_distance, dual_level)
    "daformer": (True, True, False),
    "dida": (True, True, True),  # 6.8
    "source_only": (False, False, False),
}


@pytest.mark.parametrize("name", list(PRESET_DELTAS))
def test_preset_reproduces_the_spec_experiment(name, no_data_root_env):
    cfg = load_config(name)
    source_kind = "synthia" if name.startswith("synthia") else "gta"
    method = name.split("_", 1)[1]
    d, u = cfg.data, cfg.uda
    # model (1.1-1.3, 1.2 (a))
    assert (cfg.model.segmentor, cfg.model.backbone, cfg.model.pretrained) == ("encoder_decoder", "mit_b5",
                                                                               PRETRAINED)
    assert (cfg.model.decoder_channels, cfg.model.num_classes, cfg.model.drop_path_rate) == (256, 19, 0.1)
    # data (2.5, 3)
    assert (d.source.kind, d.source.img_scale, d.source.crop_size) == (source_kind, SOURCE_SCALE[source_kind],
                                                                       [512, 512])
    assert (d.source.cat_max_ratio, d.source.flip_prob) == (0.75, 0.5)
    assert (d.target.kind, d.target.split, d.target.img_scale, d.target.crop_size) == ("cityscapes", "train",
                                                                                       [1024, 512], [512, 512])
    assert (d.target.cat_max_ratio, d.target.flip_prob) == (1.0, 0.5)
    assert (d.val.kind, d.val.split, d.val.img_scale, d.val.flip_prob) == ("cityscapes", "val", [1024, 512], 0.0)
    assert (d.rcs.enabled, d.rcs.temperature, d.rcs.min_pixels, d.rcs.min_crop_ratio) == (True, 0.01, 3000, 0.5)
    assert d.batch_size == 2
    # method switches (4, 5, 6.8)
    assert (u.self_training, u.feature_distance.enabled, u.dual_level.enabled) == METHOD[method]
    assert (u.ema.alpha, u.pseudo_threshold, u.feature_distance.weight) == (0.999, 0.968, 0.005)
    assert (u.augment.color_jitter_strength, u.augment.color_jitter_prob, u.augment.blur) == (0.2, 0.2, True)
    if method == "dida":  # 6.1, 6.2
        bank = GTA_BANK if source_kind == "gta" else SYNTHIA_BANK
        assert u.bank.init == "from_file"
        assert (u.bank.features_path, u.bank.labels_path) == (bank + "f_buffer_s.npz", bank + "l_buffer_s.npz")
        assert (u.bank.momentum, u.bank.update_interval) == (0.999, 50)
        assert (u.dual_level.instance_weight, u.dual_level.calibrate, u.dual_level.a_smooth) == (0.5, True, 1.0)
        assert not u.dual_level.weak_augment
    # schedule and run (7)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.head_lr_mult, cfg.optim.warmup_iters) == (
        6e-5, 0.01, 10.0, 1500)
    assert (cfg.train.max_iters, cfg.train.checkpoint_interval, cfg.train.eval_interval) == (40000, 1600, 1600)
    assert cfg.run.seed == SEED[source_kind]
    assert cfg.eval.mode == "whole"

"""The HRDA presets, each pinned as its difference from the preset it inherits, against hrda_mic.md."""

from __future__ import annotations

from typing import Any

import pytest
from test_config_defaults import _same, flat

from dida.config import load_config

HRDA_DATA_AND_RUN = {
    "model.segmentor": "hrda",  # 1 (model.hrda defaults are the MIC(HRDA) values, pinned in test_config_defaults)
    # 2.1: GTA Resize(2560,1440) keep ratio, RandomCrop 1024x1024; Cityscapes Resize(2048,1024), RandomCrop
    # 1024x1024; val at 2048x1024.
    "data.source.img_scale": [2560, 1440],
    "data.source.crop_size": [1024, 1024],
    "data.target.img_scale": [2048, 1024],
    "data.target.crop_size": [1024, 1024],
    "data.val.img_scale": [2048, 1024],
    # 2.3: crop_pseudo_margins [30, 240, 30, 30] (the canvas is the reference's, Q17, the default), and
    # pseudo_weight_ignore_top/bottom 0 (3.1).
    "data.target.pseudo_margins": [30, 240, 30, 30],
    "uda.pseudo_weight_ignore_top": 0,
    "uda.pseudo_weight_ignore_bottom": 0,
    # 2.4: min_crop_ratio 2.0
    "data.rcs.min_crop_ratio": 2.0,
    # 5: evaluation every 4000 (iters // 10), a checkpoint only at 40000 with max_keep 1 (train.keep_last's
    # default 1 already keeps one)
    "train.eval_interval": 4000,
    "train.checkpoint_interval": 0,
    # 1.1 / 1.7 test_cfg: slide, crop 1024x1024, stride 512x512, batched_slide
    "eval.mode": "slide",
    "eval.crop_size": [1024, 1024],
    "eval.stride": [512, 512],
    "eval.batched_slide": True,
    # 5: "the HRDA standalone config uses seed 1"
    "run.seed": 1,
    "run.dir": "work_dirs/gta2cs_hrda",
}
MIC = {  # 3.1 / 4.1: separatetrgaug, mask_ratio 0.7, block 64, mask_lambda 1, 'same' teacher; 5: seed 2
    "uda.mic.enabled": True,
}

# preset -> (parent, its delta from the parent)
DELTAS: dict[str, tuple[str, dict[str, Any]]] = {
    "gta2cs_hrda": ("gta2cs_daformer", HRDA_DATA_AND_RUN),
    # 2.2: SYNTHIA Resize(2560,1520)
    "synthia2cs_hrda": ("gta2cs_hrda", {"data.source.kind": "synthia", "data.source.root": "data/synthia",
                                        "data.source.img_scale": [2560, 1520],
                                        "run.dir": "work_dirs/synthia2cs_hrda"}),
    "gta2cs_mic_hrda": ("gta2cs_hrda", {**MIC, "run.seed": 2, "run.dir": "work_dirs/gta2cs_mic_hrda"}),
    "synthia2cs_mic_hrda": ("synthia2cs_hrda", {**MIC, "run.seed": 2, "run.dir": "work_dirs/synthia2cs_mic_hrda"}),
    # no reference run: DIDA's term and bank (gta2cs_dida's GTA bank) on top; chunks of 32 1024-px rows
    "gta2cs_dida_mic_hrda": ("gta2cs_mic_hrda", {
        "uda.dual_level.enabled": True, "uda.dual_level.chunk_rows": 32,
        "uda.bank.features_path": "embedding_cache/balanced avg cache 300/f_buffer_s.npz",
        "uda.bank.labels_path": "embedding_cache/balanced avg cache 300/l_buffer_s.npz",
        "run.dir": "work_dirs/gta2cs_dida_mic_hrda"}),
    "synthia2cs_dida_mic_hrda": ("synthia2cs_mic_hrda", {
        "uda.dual_level.enabled": True, "uda.dual_level.chunk_rows": 32,
        "uda.bank.features_path": "embedding_cache/Synthia2cs cache 300/f_buffer_s.npz",
        "uda.bank.labels_path": "embedding_cache/Synthia2cs cache 300/l_buffer_s.npz",
        "run.dir": "work_dirs/synthia2cs_dida_mic_hrda"}),
    # the reference's geometry / 8 on the 256x128 synthetic images (the crops are synth_base's 128x128)
    "synth_hrda": ("synth_daformer", {
        "model.segmentor": "hrda", "model.hrda.detail_crop_size": [64, 64], "model.hrda.attention_embed_dim": 128,
        "data.target.pseudo_margins": [4, 30, 4, 4], "data.target.pseudo_margins_canvas": "image",
        "data.rcs.min_crop_ratio": 2.0, "uda.pseudo_weight_ignore_top": 0, "uda.pseudo_weight_ignore_bottom": 0,
        "eval.mode": "slide", "eval.crop_size": [128, 128], "eval.stride": [64, 64], "eval.batched_slide": True,
        "run.dir": "work_dirs/synth_hrda"}),
    "synth_mic_hrda": ("synth_hrda", {**MIC, "uda.mic.block_size": 8, "run.dir": "work_dirs/synth_mic_hrda"}),
}


@pytest.fixture(autouse=True)
def no_data_root_env(monkeypatch):
    monkeypatch.delenv("DIDA_DATA_ROOT", raising=False)


@pytest.mark.parametrize("name", list(DELTAS))
def test_preset_differs_from_its_parent_exactly_as_pinned(name):
    parent, expected = DELTAS[name]
    base, preset = flat(load_config(parent)), flat(load_config(name))
    delta = {k: v for k, v in preset.items() if not _same(v, base[k])}
    assert delta == expected


def test_mic_hrda_values():
    for name in ("gta2cs_mic_hrda", "synthia2cs_mic_hrda", "gta2cs_dida_mic_hrda", "synthia2cs_dida_mic_hrda"):
        cfg = load_config(name)
        m, h = cfg.uda.mic, cfg.model.hrda
        assert (m.mode, m.block_size, m.ratio, m.mask_lambda, m.alpha, m.pseudo_threshold) == (
            "separatetrgaug", 64, 0.7, 1.0, None, None), name
        assert (h.detail_crop_size, h.crop_divisor, h.hr_loss_weight, h.scales) == ([512, 512], 8, 0.1, [0.5, 1.0])
        assert cfg.data.target.pseudo_margins_canvas == "reference" and cfg.model.pretrained == "pretrained/mit_b5.pth"
        assert cfg.uda.feature_distance.enabled and cfg.data.rcs.min_pixels == 3000 and cfg.run.seed == 2

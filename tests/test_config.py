from __future__ import annotations

import pytest

from dida.config import load_config, preset_names, to_yaml
from dida.errors import ConfigError


def test_defaults_follow_the_reference():
    cfg = load_config()
    assert cfg.uda.ema.alpha == 0.999
    assert cfg.uda.pseudo_threshold == 0.968
    assert (cfg.uda.pseudo_weight_ignore_top, cfg.uda.pseudo_weight_ignore_bottom) == (15, 120)
    assert cfg.uda.feature_distance.weight == 0.005
    assert cfg.uda.feature_distance.classes == [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]
    assert cfg.optim.lr == 6e-5 and cfg.optim.weight_decay == 0.01 and cfg.optim.head_lr_mult == 10
    assert cfg.train.max_iters == 40000 and cfg.optim.warmup_iters == 1500
    assert cfg.data.batch_size == 2 and cfg.data.source.crop_size == [512, 512]
    assert cfg.data.rcs.temperature == 0.01 and cfg.data.rcs.min_pixels == 3000
    assert cfg.uda.bank.momentum == 0.999 and cfg.uda.bank.update_interval == 50
    assert cfg.uda.dual_level.instance_weight == 0.5 and cfg.uda.dual_level.a_smooth == 1.0


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_accepts_the_stable_overrides(name, tmp_path):
    cfg = load_config(name, [f"run.dir={tmp_path}", "run.seed=3", "run.deterministic=true",
                             "train.max_iters=7", "train.checkpoint_interval=2", "train.eval_interval=3",
                             f"data.source.root={tmp_path}/s", f"data.target.root={tmp_path}/t"])
    assert cfg.train.max_iters == 7 and cfg.run.seed == 3 and cfg.data.source.root == f"{tmp_path}/s"


def test_reference_presets():
    gta = load_config("gta2cs_dida")
    syn = load_config("synthia2cs_dida")
    assert gta.uda.self_training and gta.uda.dual_level.enabled and gta.model.backbone == "mit_b5" and gta.run.seed == 0
    assert "balanced avg cache 300" in gta.uda.bank.features_path
    assert syn.data.source.kind == "synthia" and syn.data.source.img_scale == [1280, 760] and syn.run.seed == 2
    assert "Synthia2cs cache 300" in syn.uda.bank.labels_path
    src_only = load_config("gta2cs_source_only").uda
    assert not src_only.self_training and not src_only.dual_level.enabled and not src_only.feature_distance.enabled


def test_default_roots_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("DIDA_DATA_ROOT", "shared_datasets")
    cfg = load_config("gta2cs_daformer")
    assert cfg.data.source.root == "shared_datasets/gta" and cfg.data.val.root == "shared_datasets/cityscapes"


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=1", "optim.lrr"),  # unknown key
        ("optim.lr=abc", "optim.lr"),  # wrong type
        ("optim.lr=-0.1", "optim.lr"),  # out of range
        ("uda.ema.alpha=1.5", "uda.ema.alpha"),
        ("uda.bank.momentum=-0.1", "uda.bank.momentum"),
        ("data.source.crop_size=[4000,4000]", "data.source.crop_size"),
        ("uda.method=fancy", "uda.method"),
    ],
)
def test_bad_configs_are_refused_with_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny_cpu", [override])


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_iter: 3\n")
    with pytest.raises(ConfigError, match="train.max_iter"):
        load_config(str(p))


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    p.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError):
        load_config(str(p))
    assert not marker.exists()


def test_missing_config_names_the_presets(tmp_path):
    with pytest.raises(ConfigError, match="tiny_cpu"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="Presets"):
        load_config("no_such_preset")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("gta2cs_dida", ["train.max_iters=11"])
    p = tmp_path / "config.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(str(p)) == cfg


def test_every_preset_describes_itself_in_one_line():
    from dida.config import preset_descriptions

    for name, text in preset_descriptions().items():
        assert text and "\n" not in text and len(text) <= 140, name

"""Configuration faults are refused before any work starts, naming the key (issue 9, item 5).

tests/test_config.py covers ``load_config`` itself (unknown key, wrong type, negative lr, momentum,
huge crop, unsafe YAML tag); here: the same refusals through ``dida train`` (no run directory is
created, a --resume leaves the run untouched), values that are only just out of range, and more unsafe
YAML constructs.
"""

from __future__ import annotations

import pytest
from rel_helpers import data_overrides, tiny_cfg

from dida.cli import main
from dida.config import load_config
from dida.engine.train import train
from dida.errors import ConfigError

BAD_OVERRIDES = [
    ("optim.lr=-0.001", "optim.lr", "must be > 0"),
    ("optim.lr=0", "optim.lr", "must be > 0"),
    ("optim.lr=fast", "optim.lr", ""),  # wrong type
    ("train.max_iters=1.5", "train.max_iters", ""),
    ("train.max_iter=10", "train.max_iter", "unknown key"),
    ("uda.ema.alpha=1.001", "uda.ema.alpha", r"\[0, 1\]"),
    ("uda.bank.momentum=-0.5", "uda.bank.momentum", r"\[0, 1\]"),
    ("optim.betas=[0.9,1.0]", "optim.betas", ""),
    # tiny_cpu resizes sources to 128x72: a 100x100 crop is larger than the short side
    ("data.source.crop_size=[100,100]", "data.source.crop_size", "larger than the image scale"),
    ("data.target.crop_size=[64,200]", "data.target.crop_size", "larger than the image scale"),
    ("uda.method=dida2", "uda.method", ""),
]


@pytest.mark.parametrize("override, key, why", BAD_OVERRIDES)
def test_dida_train_refuses_bad_values_before_work_starts(override, key, why, rel_data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "tiny_cpu", f"run.dir={run}", *data_overrides(rel_data), override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("dida train: error:") and "Traceback" not in err
    assert key in err
    if why:
        import re

        assert re.search(why, err), err
    assert not run.exists()  # nothing was created: the check ran before any work


def test_resume_with_a_bad_override_leaves_the_run_untouched(rel_data, tmp_path, capsys):
    run = train(tiny_cfg(rel_data, tmp_path / "run", "train.max_iters=2"))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(run), "optim.lr=-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_yaml_file_with_bad_values_names_the_key(tmp_path):
    cases = {
        "optim:\n  lr: -1.0e-4\n": "optim.lr",
        "optim:\n  lr: [1, 2]\n": "optim.lr",
        "uda:\n  ema:\n    alpha: 2\n": "uda.ema.alpha",
        "data:\n  source:\n    crop_size: [512, 512]\n": "data.source.crop_size",  # > tiny img_scale
        "train:\n  checkpoint_interval: -5\n": "train.checkpoint_interval",
        "train:\n  keep_last: 0\n": "train.keep_last",
        "model:\n  decoder_channel: 64\n": "model.decoder_channel",
    }
    for i, (text, key) in enumerate(cases.items()):
        p = tmp_path / f"c{i}.yaml"
        p.write_text("inherit: tiny_cpu\n" + text)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(str(p))


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system ['touch {m}']",
    "!!python/object/new:subprocess.Popen [['touch', '{m}']]",
    "{{train: !!python/object/apply:os.system ['touch {m}']}}",
    "train:\n  max_iters: !!python/object/apply:os.system ['touch {m}']",
    "!!python/name:os.system",
])
def test_unsafe_yaml_tags_are_refused_and_not_executed(tag, tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.yaml"
    p.write_text(tag.format(m=marker) + "\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(p))
    assert not marker.exists()


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    import time

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError):
        load_config(str(p))
    assert time.perf_counter() - t0 < 5


def test_self_referencing_yaml_alias_is_refused(tmp_path):
    p = tmp_path / "loop.yaml"
    p.write_text("train: &a [1, *a]\n")
    with pytest.raises(ConfigError):
        load_config(str(p))

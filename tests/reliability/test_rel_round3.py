"""Round 3 (issue 15): an independent adversarial pass through the command line found these; each test failed
before its fix. Seeds below 0 (a `bug:` line), `dida export --metrics` files that are not a `dida test`
metrics.json (a `bug:` line, or a model card showing 5730.00 / nan), YAML keys given twice (the first value
silently ignored), an output path that is a dangling or looping symbolic link (found only after the work, with a
misleading "File exists"; a dangling link given as a file output was replaced without --force), a zeroed file or
tar archive as a checkpoint (torch's advice to set weights_only=False), configuration type errors without the
fix, `--resume` with `train.max_iters` below the reached iteration (config.yaml rewritten, exit 0), exported
safetensors written 0o600, `weights verify --name` passing a resized variant. docs/reliability.md has the counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rel_helpers import data_overrides

from dida.cli import main
from dida.config import load_config
from dida.errors import ConfigError, DidaError
from dida.io import claim_output


def one_error(capsys, *expected: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err and ": bug: " not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv", [
    ["synth", "{tmp}/s", "--size", "64", "32", "--seed", "-1", "--nproc", "1"],
    ["bank", "build", "{run}/latest.pth", "--out", "{tmp}/b", "--seed", "-3", "--size", "2", "--max-images", "1",
     "--device", "cpu"],
    ["demo", "--out", "{tmp}/d", "--seed", "-1", "--quick"],
])
def test_negative_seeds_are_one_line_before_any_work(argv, tiny_run, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, run=tiny_run) for a in argv]
    assert main(argv) == 2
    one_error(capsys, "--seed must be >= 0", "got -")
    assert list(tmp_path.iterdir()) == []


def _metrics_files(tmp_path: Path) -> dict[str, object]:
    good = {"aAcc": 0.5, "mIoU": 0.25, "mAcc": 0.3, "per_class": {"road": {"IoU": 0.5, "Acc": None}}}
    return {
        "a_list": [1, 2],
        "no_miou": {"not": "metrics"},
        "miou_text": {"mIoU": "high"},
        "miou_percent": {**good, "mIoU": 57.3},
        "miou_negative": {**good, "mIoU": -0.1},
        "miou_bool": {**good, "mIoU": True},
        "aacc_nan": {**good, "aAcc": float("nan")},
        "per_class_percent": {**good, "per_class": {"road": {"IoU": 50.0}}},
        "per_class_a_list": {**good, "per_class": [0.1]},
        "per_class_entry_text": {**good, "per_class": {"road": "good"}},
        "dataset_text": {**good, "dataset": "cityscapes"},
    }


def test_export_refuses_metrics_that_are_not_a_dida_test_file(tiny_run, tmp_path, capsys):
    for name, data in _metrics_files(tmp_path).items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        assert main(["export", str(tiny_run), "--to", str(tmp_path / "exp"), "--metrics", str(path)]) == 2, name
        one_error(capsys, str(path))
        assert not (tmp_path / "exp").exists(), name
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"aAcc": 0.5, "mIoU": 0.25, "mAcc": None,
                                "per_class": {"road": {"IoU": 0.5, "Acc": None}}}))
    assert main(["export", str(tiny_run), "--to", str(tmp_path / "exp"), "--metrics", str(good)]) == 0
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "| 25.00 |" in card and "| 50.00 |" in card


def test_metrics_written_by_dida_test_are_accepted_by_export(tiny_run, tmp_path, capsys):
    assert main(["test", str(tiny_run), "--out", str(tmp_path / "t"), "--limit", "1", "--device", "cpu"]) == 0
    assert main(["export", str(tiny_run), "--to", str(tmp_path / "exp"),
                 "--metrics", str(tmp_path / "t" / "metrics.json")]) == 0
    assert "| mIoU |" in (tmp_path / "exp" / "README.md").read_text()


@pytest.mark.parametrize("text, key", [
    ("optim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "'lr'"),
    ("optim:\n  lr: 1.0e-3\noptim:\n  lr: 2.0e-3\n", "'optim'"),
    ("inherit: tiny_cpu\ninherit: synth_dida\n", "'inherit'"),
    ("data:\n  source:\n    crop_size: [64, 64]\n    crop_size: [32, 32]\n", "'crop_size'"),
])
def test_yaml_keys_given_twice_are_refused_naming_the_key_and_lines(text, key, tmp_path, rel_data):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"dup.yaml: key {key} is given twice .*lines \d+ and \d+"):
        load_config(str(path), data_overrides(rel_data))


def test_claim_output_refuses_a_dangling_or_looping_link_even_with_force(tmp_path):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "dangling.pth").symlink_to(tmp_path / "missing" / "x.pth")
    cases = [(tmp_path / "loop1", "dir"), (tmp_path / "loop1" / "sub", "dir"), (tmp_path / "loop1", "file"),
             (tmp_path / "dangling.pth", "file"), (tmp_path / "dangling.pth" / "sub", "dir")]
    for path, kind in cases:
        for force in (False, True):
            with pytest.raises(DidaError, match="symbolic link to a missing target"):
                claim_output(path, kind=kind, force=force, option="--out")
    assert os.readlink(tmp_path / "dangling.pth") == str(tmp_path / "missing" / "x.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.pth", "loop1", "loop2"]


def test_a_command_writing_into_a_looping_link_fails_before_any_work(tiny_run, tmp_path, capsys):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    assert main(["test", str(tiny_run), "--out", str(tmp_path / "loop1"), "--limit", "1", "--device", "cpu"]) == 2
    one_error(capsys, "loop1", "symbolic link")


def test_zeroed_files_and_tar_archives_are_truncated_or_not_a_checkpoint(tiny_run, tmp_path, capsys):
    """torch takes a file of zeros (a zeroed block, as a failed copy leaves) for its legacy .tar format; its
    message suggested weights_only=False. Now the usual line (and --allow-pickle for a trusted legacy file)."""
    import tarfile

    (tmp_path / "zeros.pth").write_bytes(bytes(8192))
    (tmp_path / "member.txt").write_text("x")
    with tarfile.open(tmp_path / "archive.pth", "w") as tar:
        tar.add(tmp_path / "member.txt", "member.txt")
    img = tmp_path / "img.png"
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(img)
    for name in ("zeros.pth", "archive.pth"):
        path = str(tmp_path / name)
        assert main(["weights", "verify", path]) == 2
        one_error(capsys, path, "truncated or not a checkpoint")
        assert main(["infer", path, str(img), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
        line = one_error(capsys, path, "truncated or not a checkpoint")
        assert "weights_only" not in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("override, expected", [
    ("optim=5", "'optim' is a section, not a single value"),
    ("uda=[1,2]", "'uda' is a section, not a single value"),
    ("optim.lr=", "'optim.lr' needs a value"),
    ("data.source.root=", "'data.source.root' needs a value"),
    ("model=null", "'model' needs a value"),
    ("data.batch_size=true", "--help-config"),
])
def test_override_type_errors_say_what_to_do(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", [override])
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text, expected", [
    ("inherit: tiny_cpu\noptim: 5\n", "'optim' is a section, not a single value"),
    ("inherit: tiny_cpu\noptim:\n", "'optim' needs a value"),
])
def test_yaml_sections_given_a_value_name_the_section(text, expected, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(str(path))


def test_resume_with_max_iters_below_the_reached_iteration_keeps_config_yaml(rel_data, tmp_path, capsys):
    """It printed 'already finished its 1 iterations' (exit 0) and rewrote config.yaml with max_iters 1, below the
    checkpoints' iteration 2; the plain --resume then did nothing."""
    from rel_helpers import tiny_cfg

    from dida.engine.train import train

    run = train(tiny_cfg(rel_data, tmp_path / "run", "train.max_iters=2"))
    config = (run / "config.yaml").read_text()
    assert main(["train", "--resume", str(run), "train.max_iters=1"]) == 2
    one_error(capsys, "train.max_iters=1 is below the iteration", "(2)", "config.yaml is left as it was")
    assert (run / "config.yaml").read_text() == config
    assert main(["train", "--resume", str(run), "train.max_iters=2"]) == 0  # equal: finished, nothing to do
    assert (run / "config.yaml").read_text() == config
    assert main(["train", "--resume", str(run), "train.max_iters=3"]) == 0


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_weights_get_the_mode_of_open_not_0600(tiny_run, tmp_path, umask):
    """safetensors wrote model.safetensors / ema_model.safetensors with 0o600 whatever the umask (a shared
    export folder was unreadable to the group); the rest of the folder had the umask's modes."""
    old = os.umask(umask)
    try:
        assert main(["export", str(tiny_run), "--to", str(tmp_path / "exp")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "exp").iterdir()}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_weights_verify_name_refuses_a_resized_variant(tiny_run, tmp_path, capsys):
    """A model called mit_b0 whose embed_dims / depths were overridden passed `verify --name mit_b0` ("OK: ... is
    the SegFormer MiT-B0 encoder") since only the backbone's name was compared."""
    import torch

    from dida.checkpoint import save_checkpoint
    from dida.config import to_yaml
    from dida.models import build_model

    assert main(["weights", "verify", str(tiny_run / "latest.pth"), "--name", "mit_b0"]) == 2
    one_error(capsys, "not the SegFormer MiT-B0", "embed_dims [8, 16, 32, 64]")
    cfg = load_config("tiny_cpu", ["model.decoder_channels=16"])
    model = build_model(cfg.model, generator=torch.Generator().manual_seed(0))
    save_checkpoint(tmp_path / "b0.pth", {"model": model.state_dict(), "ema_model": None, "iteration": 1,
                                          "config": to_yaml(cfg), "meta": {}})
    assert main(["weights", "verify", str(tmp_path / "b0.pth"), "--name", "mit_b0"]) == 0

"""Never clobber (issue 15, class 1): every command claims its outputs with ``dida.io.claim_output`` before any
work; an existing output needs ``--force``, an output that is its own input is refused even then, a file where a
folder is needed (or the reverse) is one line; writes are atomic with the modes a plain ``open`` gives; a run
that fails at once (or a refused ``--resume``) leaves ``config.yaml`` as it was; a failed evaluation keeps the
training since the last checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from rel_helpers import data_overrides, tiny_cfg

from dida.cli import main
from dida.errors import DataError, DidaError
from dida.io import atomic_open, claim_output, make_temp_dir


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error(capsys, *expected: str) -> str:
    """The command's stderr: exactly one ``dida ...: error:`` line, no traceback, and the ``expected`` texts."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------- claim_output itself


def test_claim_output_refuses_what_it_must_and_creates_nothing(tmp_path):
    src = tmp_path / "in.pth"
    src.write_bytes(b"input")
    (tmp_path / "out.pth").write_bytes(b"earlier output")
    os.link(src, tmp_path / "hardlink.pth")
    (tmp_path / "symlink.pth").symlink_to(src)
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    refused = {
        "out.pth": ({}, "--force"),  # exists
        "in.pth": ({"force": True}, "is the input"),  # itself, even with --force
        "hardlink.pth": ({"force": True}, "is the input"),
        "symlink.pth": ({"force": True}, "is the input"),
        "folder": ({}, "is a folder"),
        "a_file/out.pth": ({}, "is a file"),
    }
    for name, (kwargs, why) in refused.items():
        with pytest.raises(DidaError, match=why):
            claim_output(tmp_path / name, inputs=[src], option="OUTPUT", **kwargs)
    claim_output(tmp_path / "out.pth", inputs=[src], force=True)
    claim_output(tmp_path / "new" / "deeper" / "out.pth", inputs=[src])
    assert not (tmp_path / "new").exists()  # a claim creates nothing
    assert src.read_bytes() == b"input" and (tmp_path / "out.pth").read_bytes() == b"earlier output"


def test_claim_output_of_a_folder_names_the_files_it_would_replace(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    claim_output(out, kind="dir", files=["metrics.json"])  # other files in the folder are no conflict
    (out / "metrics.json").write_text("{}")
    with pytest.raises(DidaError, match=r"metrics\.json; pass --force"):
        claim_output(out, kind="dir", files=["metrics.json", "iou.png"], option="--out")
    claim_output(out, kind="dir", files=["metrics.json"], force=True)
    with pytest.raises(DidaError, match="mine.txt"):  # files=None: any content is a conflict
        claim_output(out, kind="dir")
    with pytest.raises(DidaError, match="is a file"):
        claim_output(out / "mine.txt", kind="dir")


def test_claim_output_finds_a_read_only_or_full_disk_before_any_work(tmp_path, monkeypatch):
    for code in (errno.EROFS, errno.ENOSPC, errno.EACCES):
        def refuse(*args, code=code, **kwargs):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
        with pytest.raises(OSError) as e:
            claim_output(tmp_path / "sub" / "out", kind="dir")
        assert e.value.errno == code and e.value.filename == str(tmp_path / "sub" / "out")


# ---------------------------------------------------------------------------------------- atomic writes


def test_atomic_writes_get_the_modes_of_open_not_0600(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_open(tmp_path / "new.json") as f:
            f.write("{}")
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640
        (tmp_path / "private.json").write_text("x")
        (tmp_path / "private.json").chmod(0o600)
        with atomic_open(tmp_path / "private.json") as f:  # a replaced file keeps its mode
            f.write("y")
        assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
        assert make_temp_dir(tmp_path, ".x.").stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old)


def test_a_failed_atomic_write_names_the_destination_and_keeps_the_old_file(tmp_path, monkeypatch):
    dest = tmp_path / "metrics.json"
    dest.write_text("old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError) as e, atomic_open(dest) as f:
        f.write("new")
    assert e.value.filename == str(dest) and dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left
    monkeypatch.undo()
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(IsADirectoryError) as e, atomic_open(tmp_path / "folder.json") as f:
        f.write("x")
    assert e.value.filename == str(tmp_path / "folder.json")


# ----------------------------------------------------------------------------------------- the commands


def _mmcv_checkpoint(tiny_run: Path, path: Path) -> Path:
    import torch

    sd = torch.load(tiny_run / "latest.pth", weights_only=True)["model"]
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "meta": {"iter": 2}}, path)
    return path


def test_convert_checkpoint_never_replaces_its_input_nor_an_output_without_force(tiny_run, tmp_path, capsys):
    src = _mmcv_checkpoint(tiny_run, tmp_path / "mmcv.pth")
    os.link(src, tmp_path / "link.pth")
    (tmp_path / "out.pth").write_bytes(b"precious")
    (tmp_path / "folder").mkdir()
    before = _digest(tmp_path)
    cases = [(["convert-checkpoint", str(src), str(src), "--force"], "is the input"),
             (["convert-checkpoint", str(src), str(tmp_path / "link.pth")], "is the input"),
             (["convert-checkpoint", str(src), str(tmp_path / "out.pth")], "--force"),
             (["convert-checkpoint", str(src), str(tmp_path / "folder")], "is a folder"),
             (["convert-checkpoint", str(src), str(tmp_path / "out.pth" / "x.pth")], "is a file")]
    for argv, why in cases:
        assert main(argv) == 2, argv
        one_error(capsys, why)
    assert _digest(tmp_path) == before
    assert main(["convert-checkpoint", str(src), str(tmp_path / "out.pth"), "--force"]) == 0
    assert (tmp_path / "out.pth").read_bytes() != b"precious" and src.read_bytes() == (tmp_path / "link.pth").read_bytes()


def _images(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    img = (rng.random((40, 60, 3)) * 255).astype(np.uint8)
    folder.mkdir(parents=True)
    for name in ("a.png", "a.jpg", "b.png"):
        cv2.imwrite(str(folder / name), img)
    return folder


def test_infer_keeps_every_prediction_and_replaces_only_with_force(tiny_run, tmp_path, capsys):
    images = _images(tmp_path / "imgs")
    out = tmp_path / "out"
    ckpt = str(tiny_run / "latest.pth")
    assert main(["infer", ckpt, str(images), "--out", str(out), "--device", "cpu"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a_jpg_labelTrainIds.png", "a_jpg_pred.png", "a_png_labelTrainIds.png", "a_png_pred.png",
                     "b_labelTrainIds.png", "b_pred.png"]  # a.png and a.jpg both kept
    before = _digest(out)
    capsys.readouterr()
    assert main(["infer", ckpt, str(images), "--out", str(out), "--device", "cpu"]) == 2
    one_error(capsys, "_pred.png", "--force")
    assert _digest(out) == before
    assert main(["infer", ckpt, str(images / "b.png"), "--out", str(images / "a.png"), "--device", "cpu"]) == 2
    one_error(capsys, "is a file")
    assert main(["infer", ckpt, str(images), "--out", str(out), "--force", "--device", "cpu"]) == 0
    # Outputs beside the inputs (--out is the input folder), sub-folders mirrored; a rerun needs --force.
    (images / "sub").mkdir()
    shutil.copy(images / "b.png", images / "sub" / "b.png")
    argv = ["infer", ckpt, str(images), "--recursive", "--out", str(images), "--device", "cpu"]
    assert main(argv) == 0
    assert (images / "b_pred.png").is_file() and (images / "sub" / "b_pred.png").is_file()
    assert main(argv) == 2
    one_error(capsys, "--force")


def test_test_and_bank_build_refuse_to_replace_earlier_results(tiny_run, rel_data, tmp_path, capsys):
    out = tmp_path / "test"
    argv = ["test", str(tiny_run), "--out", str(out), "--limit", "1", "--device", "cpu"]
    assert main(argv) == 0
    before = _digest(out)
    assert main(argv) == 2
    one_error(capsys, "metrics.json", "--force")
    assert _digest(out) == before
    assert main([*argv, "--force"]) == 0
    assert main(["test", str(tiny_run), "--out", str(tmp_path / "test" / "metrics.json"), "--device", "cpu"]) == 2
    one_error(capsys, "is a file")

    bank = tmp_path / "bank"
    bank.mkdir()
    (bank / "f_buffer_s.npz").write_bytes(b"an earlier bank")
    assert main(["bank", "build", str(tiny_run / "latest.pth"), "--out", str(bank), "--size", "4",
                 "--max-images", "1", "--device", "cpu"]) == 2
    one_error(capsys, "f_buffer_s.npz", "--force")
    assert (bank / "f_buffer_s.npz").read_bytes() == b"an earlier bank"


def test_synth_and_demo_never_replace_data_or_runs_that_are_not_theirs(tmp_path, capsys):
    from dida.engine.demo import METHODS, check_outputs, method_config

    root = tmp_path / "data"
    (root / "gta" / "images").mkdir(parents=True)
    (root / "gta" / "images" / "00001.png").write_bytes(b"a real GTA image")
    synth = ["synth", str(root), "--num-source", "1", "--num-target-train", "1", "--num-val", "1", "--size", "32",
             "16", "--nproc", "1"]
    assert main(synth) == 2
    one_error(capsys, "gta", "--force")
    assert main(["synth", str(tmp_path / "data" / "gta" / "images" / "00001.png")]) == 2
    one_error(capsys, "is a file")
    assert (root / "gta" / "images" / "00001.png").read_bytes() == b"a real GTA image"

    # The demo: someone else's data, a run folder holding other files, a report of something else.
    out = tmp_path / "demo"
    cfgs = {m: method_config(m, out, out / "data", 0, None, True) for m in METHODS}
    check_outputs(out, cfgs, force=False)  # an empty --out is fine
    for make, why in [(lambda: (out / "data" / "cityscapes").mkdir(parents=True), "synth_manifest"),
                      (lambda: (out / "dida").mkdir(parents=True) or (out / "dida" / "notes.txt").write_text("x"),
                       "DIDA run"),
                      (lambda: out.mkdir(exist_ok=True) or (out / "report.md").write_text("mine"), "report.md")]:
        shutil.rmtree(out, ignore_errors=True)
        make()
        with pytest.raises(DidaError, match=why):
            check_outputs(out, cfgs, force=False)
        check_outputs(out, cfgs, force=True)
    before = _digest(out)
    assert main(["demo", "--quick", "--out", str(out)]) == 2  # refused before any work
    one_error(capsys, "report.md", "--force")
    assert _digest(out) == before and sorted(p.name for p in out.iterdir()) == ["report.md"]


def test_a_run_that_fails_at_once_leaves_the_folder_as_it_was(rel_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("my: notes\n")
    base = ["train", "tiny_cpu", f"run.dir={run}", *data_overrides(rel_data)]
    assert main([*base, f"data.source.root={tmp_path / 'nowhere'}"]) == 2  # fails while preparing
    capsys.readouterr()
    assert main(base) == 2  # another configuration in the folder: not replaced without --force
    one_error(capsys, "config.yaml", "--force")
    assert (run / "config.yaml").read_text() == "my: notes\n"
    assert main(["train", "tiny_cpu", f"run.dir={tmp_path / 'fresh'}", *data_overrides(rel_data),
                 f"data.target.root={tmp_path / 'nowhere'}"]) == 2
    assert not (tmp_path / "fresh").exists()  # a run folder the failed run created is removed again
    (tmp_path / "a_file").write_text("x")
    assert main(["train", "tiny_cpu", f"run.dir={tmp_path / 'a_file'}", *data_overrides(rel_data)]) == 2
    capsys.readouterr()
    assert main([*base, "train.max_iters=1", "--force"]) == 0


def test_a_refused_resume_keeps_config_yaml_so_that_the_plain_resume_works(rel_data, tmp_path, capsys):
    from dida.engine.train import train

    run = train(tiny_cfg(rel_data, tmp_path / "run", "train.max_iters=2"))
    config = (run / "config.yaml").read_text()
    assert main(["train", "--resume", str(run), "model.decoder_channels=32", "train.max_iters=3"]) == 2
    one_error(capsys, "does not match this run's model")
    assert (run / "config.yaml").read_text() == config
    assert main(["train", "--resume", str(run), "train.max_iters=3"]) == 0


def test_a_failed_evaluation_keeps_the_training_since_the_last_checkpoint(rel_data, tmp_path, monkeypatch):
    from dida.checkpoint import read_checkpoint
    from dida.engine import evaluate as evaluate_mod
    from dida.engine.train import train

    def broken(*args, **kwargs):
        raise DataError("val: the validation images vanished")

    monkeypatch.setattr(evaluate_mod, "evaluate", broken)
    run = tmp_path / "run"
    with pytest.raises(DataError, match="vanished"):
        train(tiny_cfg(rel_data, run, "train.max_iters=4", "train.eval_interval=3", "train.checkpoint_interval=0"))
    assert read_checkpoint(run / "latest.pth")["iteration"] == 3

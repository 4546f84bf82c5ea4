"""``dida export``: the Hub-ready folder, its checks, and ``dida test`` / ``dida infer`` / the checkpoint reader
on the folder and on its Hub id (the upload is mocked at ``HfApi``; nothing reaches a network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import yaml
from hub_helpers import TINY_MIT, add_to_cache, commit_id, folder_files
from PIL import Image

from dida.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from dida.cli import main
from dida.hub import EXPORT_META, is_export_folder, resolve

FILES = {"model.safetensors", "ema_model.safetensors", "config.yaml", "dida_export.json", "README.md"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, fake_data):
    """A run directory as the engine leaves it: iter_10.pth / latest.pth, config.yaml, eval.jsonl, test/."""
    from dida.config import load_config, to_yaml
    from dida.models import build_model

    tmp = tmp_path_factory.mktemp("export_run")
    cfg_yaml = tmp / "tiny.yaml"
    cfg_yaml.write_text(yaml.safe_dump({
        "model": {**TINY_MIT, "num_classes": 19},
        "data": {"num_workers": 0, "val": {"kind": "cityscapes", "root": str(fake_data / "formats" / "cityscapes"),
                                           "split": "val", "img_scale": [128, 64]}},
        "uda": {"dual_level": {"enabled": True}}, "run": {"dir": str(tmp / "run")}}))
    cfg = load_config(str(cfg_yaml))
    gen = torch.Generator().manual_seed(0)
    student, teacher = build_model(cfg.model, generator=gen), build_model(cfg.model, generator=gen)
    with torch.no_grad():
        student.decode_head.conv_seg.weight.normal_(0.0, 3.0, generator=gen)
    run_dir = tmp / "run"
    run_dir.mkdir()
    ckpt = {"model": student.state_dict(), "ema_model": teacher.state_dict(), "iteration": 10, "config": to_yaml(cfg)}
    save_checkpoint(run_dir / "iter_10.pth", ckpt)
    shutil.copyfile(run_dir / "iter_10.pth", run_dir / "latest.pth")
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "eval.jsonl").write_text(json.dumps({"iter": 5, "mIoU": 0.011, "aAcc": 0.2}) + "\n"
                                        + json.dumps({"iter": 10, "mIoU": 0.0123, "aAcc": 0.25}) + "\n{cut")
    assert main(["test", str(run_dir), "--device", "cpu"]) == 0  # run_dir/test/metrics.json
    return {"dir": run_dir, "student": student.state_dict(), "teacher": teacher.state_dict(), "cfg": cfg,
            "miou": json.loads((run_dir / "test" / "metrics.json").read_text())["mIoU"]}


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k, v in a.items():
        assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k


def test_export_folder_loads_back_identically(run, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(run["dir"]), "--to", str(out)]) == 0
    assert "exported " in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == FILES and is_export_folder(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    meta = json.loads((out / EXPORT_META).read_text())
    assert meta["iteration"] == 10 and meta["method"] == "DIDA" and meta["metrics"]["mIoU"] == run["miou"]
    from safetensors.torch import load_file

    _same(load_file(str(out / "model.safetensors")), run["student"])
    _same(load_file(str(out / "ema_model.safetensors")), run["teacher"])
    ckpt = read_checkpoint(out)
    assert ckpt["format"] == "dida" and ckpt["iteration"] == 10
    _same(ckpt["model"], run["student"])
    _same(ckpt["ema_model"], run["teacher"])
    # load_checkpoint(which=...) picks the right file of the folder.
    from dida.models import build_model

    model = build_model(run["cfg"].model)
    load_checkpoint(model, out, which="ema_model")
    _same(model.state_dict(), run["teacher"])
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: dida\n") and "# DIDA (mit_b0), gta -> cityscapes" in card
    assert f"| {100 * run['miou']:.2f} |" in card and "| 10 (exported) | 1.23 | 25.00 |" in card
    assert "| 18 | bicycle |" in card and "dida train config.yaml run.dir=work_dirs/run" in card
    assert f"dida test {out} data.val.root=data/cityscapes" in card


def test_existing_folder_needs_force_and_writes_are_atomic(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "export"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["export", str(run["dir"]), "--to", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists; pass --force" in err
    assert (out / "mine.txt").read_text() == "keep"
    # A failure while writing leaves the previous folder as it was, and no partial folder.
    monkeypatch.setattr("dida.export.model_card", lambda **kw: 1 / 0)
    assert main(["export", str(run["dir"]), "--to", str(out), "--force"]) == 1  # an unexpected error: a bug
    assert "bug: unexpected ZeroDivisionError" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):  # --debug shows it as it is
        main(["export", str(run["dir"]), "--to", str(out), "--force", "--debug"])
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and (out / "mine.txt").is_file()
    monkeypatch.undo()
    assert main(["export", str(run["dir"]), "--to", str(out), "--force"]) == 0
    assert {p.name for p in out.iterdir()} == FILES and [p.name for p in tmp_path.iterdir()] == ["export"]


def test_corrupted_export_is_refused(run, tmp_path):
    from dida.errors import CheckpointError

    out = tmp_path / "export"
    assert main(["export", str(run["dir"]), "--to", str(out)]) == 0
    data = bytearray((out / "ema_model.safetensors").read_bytes())
    data[-4] ^= 0x10
    (out / "ema_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="differs from the .* recorded in dida_export.json"):
        read_checkpoint(out)


def test_dida_test_and_infer_on_the_folder(run, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(run["dir"]), "--to", str(out)]) == 0
    assert main(["test", str(out), "--device", "cpu"]) == 0  # CHECKPOINT omitted: the folder's own
    assert json.loads((out / "test" / "metrics.json").read_text())["mIoU"] == run["miou"]
    assert main(["test", str(out), "data.val.split=val", "--out", str(tmp_path / "t2")]) == 0  # an override
    assert json.loads((tmp_path / "t2" / "metrics.json").read_text())["mIoU"] == run["miou"]
    assert main(["test", str(out), "--which", "ema_model", "--out", str(tmp_path / "t3")]) == 0
    assert json.loads((tmp_path / "t3" / "metrics.json").read_text())["which"] == "ema_model"
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 96, 3), dtype=np.uint8)).save(images / "a.png")
    assert main(["infer", str(out), str(images), "--out", str(tmp_path / "p1"), "--img-scale", "96", "48"]) == 0
    assert main(["infer", str(run["dir"] / "iter_10.pth"), str(images), "--out", str(tmp_path / "p2"),
                 "--img-scale", "96", "48"]) == 0
    a = np.array(Image.open(tmp_path / "p1" / "a_labelTrainIds.png"))
    assert np.array_equal(a, np.array(Image.open(tmp_path / "p2" / "a_labelTrainIds.png")))
    capsys.readouterr()
    assert main(["test", "gta2cs_dida"]) == 2  # a preset carries no checkpoint
    assert "give the CHECKPOINT to evaluate" in capsys.readouterr().err


class _FakeApi:
    """Stands in for ``huggingface_hub.HfApi``'s three calls; records them and keeps the uploaded files."""

    calls: ClassVar[list] = []
    uploaded: ClassVar[dict[str, bytes]] = {}
    exists: ClassVar[bool] = False
    fail: ClassVar[Exception | None] = None

    def repo_exists(self, repo_id, **kw):
        _FakeApi.calls.append(("repo_exists", repo_id))
        return _FakeApi.exists

    def create_repo(self, repo_id, private=False, exist_ok=False, **kw):
        _FakeApi.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kw):
        if _FakeApi.fail is not None:
            raise _FakeApi.fail
        _FakeApi.calls.append(("upload_folder", repo_id, commit_message))
        _FakeApi.uploaded = folder_files(Path(folder_path))

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/0123"
        return Info()


@pytest.fixture
def fake_api(monkeypatch):
    import huggingface_hub

    for name in ("repo_exists", "create_repo", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, getattr(_FakeApi, name))
    _FakeApi.calls, _FakeApi.uploaded, _FakeApi.exists, _FakeApi.fail = [], {}, False, None
    return _FakeApi


def test_to_hub_then_test_by_hub_id(run, tmp_path, fake_api, hf_cache, capsys):
    assert main(["export", str(run["dir"]), "--to-hub", "acme/tiny-dida", "--private"]) == 0
    assert "uploaded to https://huggingface.co/acme/tiny-dida/commit/0123" in capsys.readouterr().out
    assert [c[0] for c in fake_api.calls] == ["repo_exists", "create_repo", "upload_folder"]
    assert fake_api.calls[1] == ("create_repo", "acme/tiny-dida", True, True)
    assert set(fake_api.uploaded) == FILES
    assert "dida test hf://acme/tiny-dida data.val.root" in fake_api.uploaded["README.md"].decode()
    # What was uploaded, in the Hub's cache: the Hub id works offline, for the reader, test and infer.
    add_to_cache(hf_cache, "acme/tiny-dida", fake_api.uploaded, commit_id("upload"))
    ckpt = read_checkpoint("hf://acme/tiny-dida")
    _same(ckpt["model"], run["student"])
    _same(ckpt["ema_model"], run["teacher"])
    assert main(["test", "hf://acme/tiny-dida", "--out", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["mIoU"] == run["miou"]
    assert resolve("hf://acme/tiny-dida", which="ema_model").is_dir()


def test_hub_export_downloads_only_what_is_needed(run, tmp_path, fake_api, fake_hub):
    assert main(["export", str(run["dir"]), "--to", str(tmp_path / "e"), "--to-hub", "acme/tiny-dida"]) == 0
    fake_hub.add("acme/tiny-dida", fake_api.uploaded)
    folder = resolve("hf://acme/tiny-dida", which="model")
    assert {p.name for p in folder.iterdir()} == {"config.yaml", "dida_export.json", "model.safetensors"}
    assert not any("ema_model" in path for _, path in fake_hub.requests)
    _same(read_checkpoint(folder)["model"], run["student"])


def test_to_hub_refusals(run, fake_api, capsys):
    fake_api.exists = True
    assert main(["export", str(run["dir"]), "--to-hub", "acme/taken"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "acme/taken: already exists on the Hub; pass --force" in err
    assert [c[0] for c in fake_api.calls] == ["repo_exists"]
    fake_api.fail = PermissionError("401 Unauthorized: invalid token")
    assert main(["export", str(run["dir"]), "--to-hub", "acme/taken", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the upload failed (PermissionError: 401 Unauthorized" in err
    assert "hf auth login" in err and "add --to DIR to keep a local copy" in err
    assert main(["export", str(run["dir"])]) == 2
    assert "give --to DIR" in capsys.readouterr().err
    assert main(["export", str(run["dir"]), "--to-hub", "acme/x/file.bin"]) == 2


def test_export_a_released_mmcv_checkpoint(run, tmp_path):
    """A released training checkpoint (mmcv layout, no config inside) with the preset that describes it."""
    sd = {f"model.{k}": v for k, v in run["student"].items()}
    sd.update({f"ema_model.{k}": v for k, v in run["teacher"].items()})
    torch.save({"state_dict": sd, "meta": {"iter": 40000}}, tmp_path / "latest.pth")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"model": {**TINY_MIT, "num_classes": 19}}))
    assert main(["export", str(tmp_path / "latest.pth"), "--to", str(tmp_path / "e")]) == 2  # no config
    assert main(["export", str(tmp_path / "latest.pth"), "--to", str(tmp_path / "e"),
                 "--config", str(tmp_path / "tiny.yaml")]) == 0
    ckpt = read_checkpoint(tmp_path / "e")
    assert ckpt["iteration"] == 40000
    _same(ckpt["ema_model"], run["teacher"])

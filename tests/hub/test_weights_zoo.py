"""The model zoo table and ``dida weights list | get | verify``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hub_helpers import TINY_MIT, add_to_cache, commit_id, hf_segformer_state, tiny_mit_state, torch_bytes

from dida.cli import main
from dida.config import ModelCfg, preset_names
from dida.hub import file_sha256, parse_ref
from dida.models import build_model
from dida.zoo import UNKNOWN, load_zoo, parse_zoo

ROOT = Path(__file__).resolve().parents[2]


def test_zoo_table():
    zoo = load_zoo()
    for i in range(6):
        assert parse_ref(zoo[f"mit_b{i}"].hub).repo_id == f"nvidia/mit-b{i}"
        assert zoo[f"mit_b{i}"].file == f"mit_b{i}.pth"
    reported = {name: e.reported for name, e in zoo.items() if e.kind == "uda"}
    assert reported == {
        "daformer_gta2cs": {"mIoU": 68.3}, "daformer_synthia2cs": {"mIoU16": 60.9, "mIoU13": 67.4},
        "hrda_gta2cs": {"mIoU": 73.8}, "hrda_synthia2cs": {"mIoU16": 65.8},
        "mic_hrda_gta2cs": {"mIoU": 75.9}, "mic_hrda_synthia2cs": {"mIoU16": 67.3, "mIoU13": 74.0},
        "dida_gta2cs": {"mIoU": 71.0}, "dida_synthia2cs": {"mIoU16": 63.3, "mIoU13": 70.1},
    }
    for e in zoo.values():
        assert e.preset is None or e.preset in preset_names(), e.name
        assert e.sha256 == UNKNOWN or re.fullmatch("[0-9a-f]{64}", e.sha256), e.name
        assert e.url.startswith("https://") and e.source
    # The released file names that the release pages give.
    assert zoo["daformer_gta2cs"].file == "211108_1622_gta2cs_daformer_s0_7f24c.tar.gz"
    assert zoo["hrda_gta2cs"].file == "gtaHR2csHR_hrda_246ef.tar.gz"
    assert zoo["dida_gta2cs"].file == "DIDA_gta2cs.zip"
    # Installed as package data.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dida = \[.*"zoo\.yaml".*\]$', pyproject, re.MULTILINE)


@pytest.mark.parametrize(("raw", "says"), [
    ({"x": {"kind": "uda", "title": "t", "file": "f", "url": "u", "sha256": "abc", "source": "s",
            "reported": {"mIoU": 1.0}}}, "sha256 must be 64"),
    ({"x": {"kind": "other", "title": "t", "file": "f", "url": "u", "sha256": UNKNOWN, "source": "s"}}, "kind"),
    ({"x": {"kind": "backbone", "title": "t", "file": "f", "url": "u", "sha256": UNKNOWN, "source": "s",
            "hub": "nvidia/mit-b5"}}, "hf:// reference"),
    ({"x": {"kind": "backbone", "title": "t", "file": "f", "url": "u", "sha256": UNKNOWN, "source": "s",
            "colour": "red"}}, "unknown fields"),
])
def test_zoo_entries_are_checked(raw, says):
    from dida.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        parse_zoo(raw)


def test_weights_list(hf_cache, capsys):
    add_to_cache(hf_cache, "nvidia/mit-b5", {"pytorch_model.bin": b"not read by list"}, commit_id("b5"))
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    for name in load_zoo():
        assert name in out
    assert "hf://nvidia/mit-b5 [cached]" in out and "hf://nvidia/mit-b4 " in out
    assert "mIoU 68.3 (released 68.85)" in out and "gta2cs_daformer" in out and str(hf_cache) in out


def test_weights_get_by_hand(capsys):
    assert main(["weights", "get", "dida_gta2cs"]) == 1
    out = capsys.readouterr().out
    assert "https://drive.google.com/file/d/1mw8mTui-I-mvs2vo0UN_xs_fQh7AMpHm" in out
    assert "unzip DIDA_gta2cs.zip -d work_dirs/" in out
    assert ("dida weights verify work_dirs/DIDA_gta2cs/221213_1011_gta2cs_dacs_a999_fdthings_rcs001_cpl_daformer_"
            "sepaspp_mitb5_poly10warm_s0_6e7fa/latest.pth --name dida_gta2cs") in out
    assert "dida test gta2cs_dida work_dirs/" in out and "If the link is dead" in out
    assert main(["weights", "get", "daformer_gta2cs"]) == 1
    assert "tar -xzf 211108_1622_gta2cs_daformer_s0_7f24c.tar.gz -C work_dirs/" in capsys.readouterr().out


def test_weights_get_from_the_hub_cache(hf_cache, capsys):
    assert main(["weights", "get", "mit_b5"]) == 2  # offline, nothing cached: one line on what to do
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hf://nvidia/mit-b5: not in the Hugging Face cache" in err
    data = torch_bytes(hf_segformer_state(tiny_mit_state(1)))
    add_to_cache(hf_cache, "nvidia/mit-b5", {"pytorch_model.bin": data}, commit_id("b5"))
    assert main(["weights", "get", "mit_b5"]) == 0
    out = capsys.readouterr().out
    assert "hf://nvidia/mit-b5 -> " in out and "model.pretrained=hf://nvidia/mit-b5" in out
    assert main(["weights", "get", "no_such_model"]) == 2
    assert "not in the model zoo; known: mit_b0" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- verify


def _mmcv_checkpoint(path: Path, num_classes: int = 4) -> Path:
    """An mmcv-style UDA training checkpoint of the tiny model (student, teacher, ImageNet model)."""
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for prefix in ("model.", "ema_model.", "imnet_model."):
        model = build_model(ModelCfg(num_classes=num_classes, **TINY_MIT), generator=gen)
        sd.update({prefix + k: v for k, v in model.state_dict().items()})
    torch.save({"state_dict": sd, "meta": {"iter": 40000}}, path)
    return path


def _zoo_with(monkeypatch, **fields) -> None:
    raw = {"tiny_release": {"kind": "uda", "title": "tiny release", "file": "latest.pth", "url": "https://x",
                            "source": "test", "reported": {"mIoU": 1.0}, **fields}}
    zoo = parse_zoo(raw)
    monkeypatch.setattr("dida.zoo.load_zoo", lambda: zoo)


def test_verify_a_file_placed_by_hand(tmp_path, monkeypatch, capsys):
    ckpt = _mmcv_checkpoint(tmp_path / "latest.pth")
    assert main(["weights", "verify", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "format:  mmcv" in out and "holds:   model (" in out and "ema_model (" in out and "imnet_model (" in out
    assert "model:   encoder_decoder on mit_b5 (embed_dims [8, 16, 32, 64]" in out and "4 classes" in out
    assert "iteration: 40000" in out and "loads:   model, ema_model strictly, with the safe loader" in out

    expect = {"format": "mmcv", "segmentor": "encoder_decoder", "num_classes": 4}
    _zoo_with(monkeypatch, sha256=file_sha256(ckpt), expect=expect)
    assert main(["weights", "verify", str(ckpt), "--name", "tiny_release"]) == 0
    assert "matches the published checksum of tiny_release" in capsys.readouterr().out

    damaged = tmp_path / "damaged.pth"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    assert main(["weights", "verify", str(damaged), "--name", "tiny_release"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not the published" in err and "Download it again" in err

    _zoo_with(monkeypatch, sha256=UNKNOWN, expect={**expect, "num_classes": 19})
    assert main(["weights", "verify", str(ckpt), "--name", "tiny_release"]) == 2
    assert "not the tiny release (tiny_release): it holds num_classes 4 (expected 19)" in capsys.readouterr().err


def test_verify_an_archive_and_an_unsafe_file(tmp_path, capsys):
    archive = tmp_path / "run.tar.gz"
    archive.write_bytes(b"\x1f\x8b not really")
    assert main(["weights", "verify", str(archive)]) == 0
    assert "an archive: extract it" in capsys.readouterr().out
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "meta": {"obj": Path("x")}}, unsafe)
    assert main(["weights", "verify", str(unsafe)]) == 2
    assert "--allow-pickle" in capsys.readouterr().err

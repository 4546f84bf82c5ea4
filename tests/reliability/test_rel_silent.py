"""Never silently wrong (issue 15, class 2): ``dida.config.validate`` knows every key's legal range and the relations
between keys; weights holding NaN / inf, or only a backbone, are refused by every command that predicts with them;
``dida convert`` reconverts labels whose source changed; devices are checked.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rel_helpers import data_overrides
from test_rel_outputs import one_error

from dida.cli import main
from dida.config import _RANGES, _range_key, load_config
from dida.errors import ConfigError


def _numeric_keys(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted key, number type) of every int / float field (also optional and list ones) of the schema."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _numeric_keys(tp, f"{prefix}{f.name}.")
            continue
        args = [a for a in (typing.get_args(tp) or (tp,)) if a is not type(None)]
        inner = [typing.get_args(a)[0] if typing.get_origin(a) is list else a for a in args]
        number = next((a for a in inner if a in (int, float)), None)
        if number is not None:
            out.append((f"{prefix}{f.name}", number))
    return out


NUMERIC_KEYS = _numeric_keys(load_config().__class__)


def test_every_numeric_key_has_a_declared_range():
    missing = [key for key, _ in NUMERIC_KEYS if _range_key(key) not in _RANGES]
    assert not missing, f"numeric keys without an entry in dida.config._RANGES: {missing}"
    assert len(NUMERIC_KEYS) > 80


def _bad_values(key: str, number: type, is_list: bool) -> list:
    spec = _RANGES[_range_key(key)]
    values: list = []
    if spec.lo is not None:
        values.append(spec.lo if spec.lo_open else spec.lo - 1)
    if spec.hi is not None:
        values.append(spec.hi if spec.hi_open else spec.hi + (1 if number is int else 0.5))
    if number is float:
        values += [float("nan"), float("inf"), float("-inf")]
    if is_list:
        n = spec.length or 1
        return [[v] * n for v in values] + ([[1] * (n + 1)] if spec.length else [])
    return values


def test_every_numeric_key_refuses_values_outside_its_range():
    import copy
    import functools

    from dida.config import validate

    base = load_config("tiny_cpu", data_overrides(Path("/data")))
    checked = 0
    for key, number in NUMERIC_KEYS:
        *parents, name = key.split(".")
        is_list = isinstance(getattr(functools.reduce(getattr, parents, base), name), list) or key in (
            "model.embed_dims", "model.num_heads", "model.depths", "model.vit.out_indices",
            "data.source.pseudo_margins", "data.target.pseudo_margins", "data.val.pseudo_margins")
        for value in _bad_values(key, number, is_list):
            cfg = copy.deepcopy(base)
            setattr(functools.reduce(getattr, parents, cfg), name, value)
            with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
                validate(cfg)
            checked += 1
    assert checked > 250


RELATIONS = [
    (["optim.min_lr=0.01"], "optim.min_lr", "<= optim.lr"),  # above tiny_cpu's lr 6e-4
    (["eval.crop_size=[64,64]", "eval.stride=[100,100]"], "eval.stride", "never be predicted"),
    (["eval.stride=[300,100]", "eval.crop_size=[256,256]"], "eval.stride", "larger than the window"),
    (["uda.pseudo_weight_ignore_top=40", "uda.pseudo_weight_ignore_bottom=24"], "pseudo_weight_ignore_top",
     "whole target crop"),
    (["data.source.crop_size=[16,16]"], "data.source.crop_size", "too small"),
    (["data.target.crop_size=[31,64]"], "data.target.crop_size", "at least 32x32"),
    (["eval.mode=slide", "eval.crop_size=[16,16]", "eval.stride=[8,8]"], "eval.crop_size", "at least 32"),
    (["model.embed_dims=[8,16,32,64]", "model.num_heads=[3,1,1,1]"], "model.num_heads", "multiple of its heads"),
    (["model.segmentor=hrda", "data.source.crop_size=[68,68]", "data.target.crop_size=[64,64]",
      "model.hrda.detail_crop_size=[32,32]"], "data.source.crop_size", "multiples of 8"),
    (["model.segmentor=hrda", "model.hrda.detail_crop_size=[96,96]"], "model.hrda.detail_crop_size", "larger than"),
    (["model.segmentor=hrda", "model.hrda.scales=[0.25,1.0]", "model.hrda.detail_crop_size=[32,32]"],
     "data.source.crop_size", "at least 128x128"),
    (["run.device=gpu"], "run.device", "not a device name"),
    (["run.device=meta"], "run.device", "not a device name"),
    (["model.aspp_dilations=[]"], "model.aspp_dilations", "at least one"),
]


@pytest.mark.parametrize("overrides, key, why", RELATIONS, ids=[r[1] + ":" + r[0][-1] for r in RELATIONS])
def test_keys_that_do_not_fit_together_are_refused(overrides, key, why):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        load_config("tiny_cpu", [*data_overrides(Path("/data")), *overrides])
    assert why in str(e.value)


def test_a_model_its_constructor_refuses_is_a_config_error(capsys, rel_data, tmp_path):
    from dida.config import ModelCfg
    from dida.models import build_model

    with pytest.raises(ConfigError, match="model: embed dim 32 is not divisible by num_heads 3"):
        build_model(ModelCfg(backbone="mit_b0", num_heads=[3, 1, 1, 1]))  # the variant's own widths
    assert main(["train", "tiny_cpu", f"run.dir={tmp_path / 'r'}", *data_overrides(rel_data),
                 "model.num_heads=[3,1,1,1]"]) == 2
    one_error(capsys, "model.*")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_not_replaced_by_the_cpu(rel_data, tmp_path, capsys, tiny_run):
    for device, why in [("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available")]:
        assert main(["train", "tiny_cpu", f"run.dir={tmp_path / 'r'}", *data_overrides(rel_data),
                     f"run.device={device}"]) == 2
        one_error(capsys, "run.device", why, "run.device=cpu")
    for device, why in [("cuda", "CUDA"), ("meta", "not meta"), ("cpu:3", "no index"), ("gpu", "not a device"),
                        ("", "not a device")]:
        assert main(["test", str(tiny_run), "--device", device, "--out", str(tmp_path / "t")]) == 2
        one_error(capsys, "--device", why)
    assert not (tmp_path / "r").exists() and not (tmp_path / "t").exists()


# --------------------------------------------------------------------------------------- weights


def _damaged(tiny_run: Path, path: Path, key: str, value: float) -> Path:
    ckpt = torch.load(tiny_run / "latest.pth", weights_only=True)
    ckpt["model"][key] = ckpt["model"][key].clone()
    ckpt["model"][key].view(-1)[0] = value
    torch.save(ckpt, path)
    return path


def _commands(ckpt: Path, run: Path, tmp: Path) -> dict[str, list[str]]:
    return {
        "test": ["test", str(run), str(ckpt), "--out", str(tmp / "t"), "--device", "cpu", "--limit", "1"],
        "infer": ["infer", str(ckpt), str(tmp / "img.png"), "--out", str(tmp / "i"), "--device", "cpu"],
        "bank": ["bank", "build", str(ckpt), "--out", str(tmp / "b"), "--size", "4", "--max-images", "1",
                 "--config", str(run), "--device", "cpu"],
        "export": ["export", str(ckpt), "--to", str(tmp / "e"), "--config", str(run)],
    }


@pytest.mark.parametrize("key, value", [("decode_head.conv_seg.weight", float("nan")),
                                        ("backbone.block2.0.attn.q.weight", float("inf")),
                                        ("backbone.patch_embed1.norm.bias", float("-inf"))])
def test_nonfinite_weights_are_refused_by_every_command_that_predicts(tiny_run, tmp_path, capsys, key, value):
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "img.png")
    ckpt = _damaged(tiny_run, tmp_path / "diverged.pth", key, value)
    for name, argv in _commands(ckpt, tiny_run, tmp_path).items():
        assert main(argv) == 2, name
        one_error(capsys, str(ckpt), key, "NaN or inf")
    assert main(["weights", "verify", str(ckpt)]) == 2
    one_error(capsys, key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diverged.pth", "img.png"]  # nothing written


def test_backbone_only_weights_are_refused_where_a_segmentor_is_needed(tiny_run, tmp_path, capsys):
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "img.png")
    sd = torch.load(tiny_run / "latest.pth", weights_only=True)["model"]
    backbone = tmp_path / "imagenet.pth"
    torch.save({"state_dict": {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}},
               backbone)
    for name, argv in _commands(backbone, tiny_run, tmp_path).items():
        assert main(argv) == 2, name
        one_error(capsys, str(backbone), "only the weights of a backbone", "model.pretrained")


# --------------------------------------------------------------------------------------- convert


def test_convert_reconverts_labels_whose_source_changed(fake_data, tmp_path):
    from dida.data.convert import convert_dataset

    root = tmp_path / "gta"
    shutil.copytree(fake_data / "formats" / "gta", root)
    src = root / "labels" / "00002.png"
    out = root / "labels" / "00002_labelTrainIds.png"
    assert convert_dataset("gta", root, nproc=1, progress=False)["converted"] == 0  # all up to date
    with Image.open(src) as img:
        palette, ids = img.getpalette(), np.asarray(img).copy()
    ids[:] = 7  # road everywhere
    changed = Image.fromarray(ids, mode="P")
    changed.putpalette(palette)
    changed.save(src)
    os.utime(src, ns=(out.stat().st_mtime_ns + 10**6,) * 2)  # newer than its conversion
    summary = convert_dataset("gta", root, nproc=1, progress=False)
    assert summary["converted"] == 1 and summary["skipped"] == 5
    assert (np.asarray(Image.open(out)) == 0).all()


def test_bank_files_and_process_counts_outside_what_works_are_refused(tmp_path):
    from dida.data.convert import convert_dataset
    from dida.errors import DataError
    from dida.uda.instance_bank import InstanceBank

    features, labels = np.random.rand(6, 8).astype(np.float32), np.arange(6) % 3
    for name, f, lab, why in [("nan", np.where(features > 0.9, np.nan, features), labels, "non-finite"),
                              ("inf", np.full_like(features, np.inf), labels, "non-finite"),
                              ("classes", features, labels + 17, "holds class 19")]:
        np.savez(tmp_path / f"{name}_f.npz", f)
        np.savez(tmp_path / f"{name}_l.npz", lab)
        with pytest.raises(DataError, match=why) as e:
            InstanceBank.from_npz(tmp_path / f"{name}_f.npz", tmp_path / f"{name}_l.npz", num_classes=19)
        assert name in str(e.value)
    with pytest.raises(DataError, match=r"--nproc must be in \[1, 256\]"):
        convert_dataset("gta", tmp_path, nproc=100_000)  # refused before any process is started
    for overrides, key in [(["run.dir="], "run.dir"), (["run.dir= "], "run.dir"),
                           (["train.compile=true", "train.compile_backend=nonexistent"], "train.compile_backend")]:
        with pytest.raises(ConfigError, match=key):
            load_config("tiny_cpu", [*data_overrides(Path("/data")), *overrides])

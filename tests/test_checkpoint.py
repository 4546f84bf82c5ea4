"""Checkpoints: every supported layout loads strictly and reproduces outputs; every bad case is clear."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
import yaml

from dida.checkpoint import (
    detect_format,
    load_checkpoint,
    load_pretrained,
    model_cfg_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
    strip_prefix,
)
from dida.commands.convert_checkpoint import main as main_convert_checkpoint
from dida.config import ModelCfg
from dida.errors import CheckpointError
from dida.models import build_mit, build_segmentor
from dida.models.mit_weights import convert_mit_state_dict, hf_to_mit_state_dict, mit_to_hf_state_dict


def _tiny(kwargs, seed: int, **over):
    model = build_segmentor(**{**kwargs, **over}, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 100)
    for m in model.modules():  # non-trivial BN statistics so that buffers matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(seed)
    return model.eval()


def _mit_kwargs(kwargs):
    return {k: kwargs[k] for k in ("embed_dims", "num_heads", "depths")}


def _same_outputs(a, b, img):
    with torch.no_grad():
        oa, ob = a.eval()(img), b.eval()(img)
    if isinstance(oa, list):
        return all(torch.equal(x, y) for x, y in zip(oa, ob))
    return torch.equal(oa.logits, ob.logits) and torch.equal(oa.embedding, ob.embedding)


IMG = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def _mmcv_checkpoint(kwargs):
    student, teacher, imnet = _tiny(kwargs, 1), _tiny(kwargs, 2), _tiny(kwargs, 3)
    sd = {}
    for prefix, m in (("model.", student), ("ema_model.", teacher), ("imnet_model.", imnet)):
        sd.update({prefix + k: v.clone() for k, v in m.state_dict().items()})
    n = len(student.state_dict())
    meta = {
        "iter": 40000, "epoch": 1, "mmcv_version": "1.3.7", "mmseg_version": "0.16.0", "seed": 0,
        "time": "Mon Jan 1", "env_info": "sys.platform: linux", "exp_name": "test",
        "config": "model = dict(type='DACS')\n", "CLASSES": ("road", "sidewalk", "building", "wall"),
        "PALETTE": [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156]],
    }
    optimizer = {
        "state": {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
                  for i in range(3)},
        "param_groups": [{"lr": 6e-5, "betas": (0.9, 0.999), "weight_decay": 0.01, "params": [i]}
                         for i in range(3 * n)],
    }
    return {"meta": meta, "state_dict": sd, "optimizer": optimizer}, student, teacher, imnet


# ----------------------------------------------------------------------------------- official MiT


def test_official_mit_layout_loads_strictly(tmp_path, tiny_model_kwargs):
    src = build_mit("mit_b0", **_mit_kwargs(tiny_model_kwargs), init=False)
    src.init_weights(torch.Generator().manual_seed(1))
    sd = dict(src.state_dict())
    sd["head.weight"] = torch.randn(1000, 64)
    sd["head.bias"] = torch.randn(1000)
    for i, wrapped in enumerate([sd, {"state_dict": sd}, {"model": sd}]):
        path = tmp_path / f"mit_{i}.pth"
        torch.save(wrapped, path)
        dst = build_mit("mit_b0", **_mit_kwargs(tiny_model_kwargs))
        info = load_checkpoint(dst, path)
        assert info["format"] == "mit" and info["target"] == "backbone"
        assert sorted(info["dropped"]) == ["head.bias", "head.weight"]
        assert _same_outputs(src, dst, IMG)
    # into a full segmentor: only the backbone changes
    seg = _tiny(tiny_model_kwargs, 9)
    head_before = {k: v.clone() for k, v in seg.decode_head.state_dict().items()}
    info = load_pretrained(seg, tmp_path / "mit_0.pth")
    assert info["num_tensors"] == len(src.state_dict())
    assert _same_outputs(src, seg.backbone, IMG)
    assert all(torch.equal(v, seg.decode_head.state_dict()[k]) for k, v in head_before.items())
    assert convert_mit_state_dict(convert_mit_state_dict(sd)).keys() == src.state_dict().keys()


def test_load_pretrained_allowed_leftovers(tmp_path, tiny_model_kwargs):
    src = build_mit("mit_b0", **_mit_kwargs(tiny_model_kwargs))
    sd = dict(src.state_dict())
    del sd["norm4.weight"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "p.pth")
    dst = build_mit("mit_b0", **_mit_kwargs(tiny_model_kwargs))
    with pytest.raises(CheckpointError, match="missing keys .*norm4.weight"):
        load_pretrained(dst, tmp_path / "p.pth")
    info = load_pretrained(dst, tmp_path / "p.pth", allowed_missing={"norm4.weight"},
                           allowed_unexpected={"extra.weight"})
    assert info["missing"] == ["norm4.weight"]
    with pytest.raises(CheckpointError, match="leftover keys differ"):
        load_pretrained(dst, tmp_path / "p.pth", allowed_missing={"norm4.weight"})


# ------------------------------------------------------------------------------------------- mmcv


@pytest.mark.parametrize("which", ["model", "ema_model", "imnet_model"])
def test_mmcv_checkpoint_loads_each_submodel(tmp_path, tiny_model_kwargs, which):
    ckpt, student, teacher, imnet = _mmcv_checkpoint(tiny_model_kwargs)
    path = tmp_path / "iter_40000.pth"
    torch.save(ckpt, path)
    assert detect_format(read_checkpoint(path)) == "mmcv"
    dst = _tiny(tiny_model_kwargs, 50)
    info = load_checkpoint(dst, path, which=which)
    src = {"model": student, "ema_model": teacher, "imnet_model": imnet}[which]
    assert info["format"] == "mmcv" and info["iteration"] == 40000 and info["target"] == "segmentor"
    assert info["num_tensors"] == len(src.state_dict())
    assert _same_outputs(src, dst, IMG)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    # bare backbone target (e.g. the ImageNet FD model): the head part is dropped explicitly
    bb = build_mit("mit_b0", **_mit_kwargs(tiny_model_kwargs))
    info = load_checkpoint(bb, path, which=which)
    assert info["target"] == "backbone" and any("decode_head" in d for d in info["dropped"])
    assert _same_outputs(src.backbone, bb, IMG)


def test_mmcv_module_prefix_and_leftovers(tiny_model_kwargs):
    ckpt, student, _, _ = _mmcv_checkpoint(tiny_model_kwargs)
    wrapped = {"state_dict": {"module." + k: v for k, v in ckpt["state_dict"].items()}}
    dst = _tiny(tiny_model_kwargs, 50)
    load_checkpoint(dst, wrapped)
    assert _same_outputs(student, dst, IMG)
    bad = {"state_dict": {**ckpt["state_dict"], "stray.weight": torch.zeros(1)}}
    with pytest.raises(CheckpointError, match="stray.weight"):
        load_checkpoint(dst, bad)
    with pytest.raises(CheckpointError, match="not 'teacher'"):
        load_checkpoint(dst, ckpt, which="teacher")
    only_student = {"state_dict": {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}}
    with pytest.raises(CheckpointError, match="no ema_model"):
        load_checkpoint(dst, only_student, which="ema_model")


def test_convert_checkpoint_cli(tmp_path, tiny_model_kwargs, capsys):
    ckpt, student, teacher, _ = _mmcv_checkpoint(tiny_model_kwargs)
    src, out = tmp_path / "latest.pth", tmp_path / "converted.pth"
    torch.save(ckpt, src)
    args = argparse.Namespace(input=str(src), output=str(out), allow_pickle=False)
    assert main_convert_checkpoint(args) == 0
    text = capsys.readouterr().out
    assert "imnet_model" in text and "dropped" in text and "iteration: 40000" in text
    conv = read_checkpoint(out)  # weights_only
    assert conv["format"] == "dida" and conv["version"] == 2 and conv["iteration"] == 40000
    assert conv["meta"]["mmcv_meta"]["CLASSES"] == ["road", "sidewalk", "building", "wall"]
    json.dumps(conv["meta"])  # plain types only
    for which, src_model in (("model", student), ("ema_model", teacher)):
        dst = _tiny(tiny_model_kwargs, 60)
        info = load_checkpoint(dst, out, which=which)
        assert info["format"] == "dida" and info["iteration"] == 40000
        assert _same_outputs(src_model, dst, IMG)
    cfg = model_cfg_from_checkpoint(conv)
    assert cfg.num_classes == 4 and cfg.embed_dims == [8, 16, 32, 64] and cfg.depths == [1, 1, 1, 1]
    # through the command line
    from dida.cli import main

    assert main(["convert-checkpoint", str(src), str(tmp_path / "c2.pth")]) == 0
    assert main(["convert-checkpoint", str(out), str(tmp_path / "c3.pth")]) == 2
    assert "already a dida checkpoint" in capsys.readouterr().err


def test_model_cfg_from_mmcv_variant(reference_dir):
    """The real b5 layout (shapes from the reference key list, as meta tensors) is recognised."""
    data = json.loads((reference_dir / "keys" / "dida_daformer_mitb5_checkpoint_layout.json").read_text())
    sd = {f"model.{e['key']}": torch.empty(e["shape"], device="meta") for e in data["segmentor_keys"]}
    cfg = model_cfg_from_checkpoint({"state_dict": sd, "meta": {}})
    assert cfg == ModelCfg(backbone="mit_b5", num_classes=19)


# -------------------------------------------------------------------------------------------- own


def test_own_format_round_trip(tmp_path, tiny_model_kwargs):
    student, teacher = _tiny(tiny_model_kwargs, 1), _tiny(tiny_model_kwargs, 2)
    model_cfg = ModelCfg(backbone="mit_b0", embed_dims=[8, 16, 32, 64], num_heads=[1, 1, 1, 1],
                         depths=[1, 1, 1, 1], decoder_channels=16, num_classes=4)
    state = {
        "model": student.state_dict(), "ema_model": teacher.state_dict(), "optimizer": {"state": {}},
        "scheduler": {"last": 3}, "iteration": 123,
        "config": yaml.safe_dump({"model": dataclasses.asdict(model_cfg)}),
        "rng": {"torch": torch.get_rng_state()}, "instance_bank": None, "meta": {"note": "x"},
    }
    path = tmp_path / "run" / "iter_123.pth"
    save_checkpoint(path, state)
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temporary left behind
    ckpt = read_checkpoint(path)
    assert ckpt["format"] == "dida" and ckpt["iteration"] == 123
    assert model_cfg_from_checkpoint(ckpt) == model_cfg
    for which, src in (("model", student), ("ema_model", teacher)):
        dst = _tiny(tiny_model_kwargs, 70)
        assert load_checkpoint(dst, path, which=which)["iteration"] == 123
        assert _same_outputs(src, dst, IMG)
    with pytest.raises(CheckpointError, match="no 'ema_model' weights"):
        load_checkpoint(_tiny(tiny_model_kwargs, 70), {**ckpt, "ema_model": None}, which="ema_model")
    # without a config the architecture is inferred from the weights
    assert model_cfg_from_checkpoint({**ckpt, "config": None}).num_classes == 4


def test_save_refuses_unsafe_values(tmp_path):
    import numpy as np

    with pytest.raises(CheckpointError, match="rng.np"):
        save_checkpoint(tmp_path / "x.pth", {"rng": {"np": np.zeros(3)}})
    with pytest.raises(CheckpointError, match="meta.step"):
        save_checkpoint(tmp_path / "x.pth", {"meta": {"step": np.int64(3)}})
    assert not list(tmp_path.iterdir())
    save_checkpoint(tmp_path / "ok.pth", {"meta": {"shape": torch.Size([2, 3]), "t": (1, 2.0, "a")}})


# -------------------------------------------------------------------------------------- HF layout


@pytest.mark.parametrize("layout,prefix,suffix", [("hub", "segformer.", ".safetensors"), ("v5", "", ".bin")])
def test_hf_layout_round_trip(tmp_path, tiny_model_kwargs, layout, prefix, suffix):
    from safetensors.torch import save_file

    src = build_mit("mit_b0", **_mit_kwargs(tiny_model_kwargs), init=False)
    src.init_weights(torch.Generator().manual_seed(4))
    hf = mit_to_hf_state_dict(src.state_dict(), layout=layout, prefix=prefix)
    assert not any("kv" in k for k in hf)
    if layout == "hub":
        assert f"{prefix}encoder.block.0.0.attention.self.key.weight" in hf
        assert f"{prefix}encoder.patch_embeddings.3.layer_norm.bias" in hf
        assert f"{prefix}encoder.layer_norm.2.weight" in hf
    hf["classifier.weight"] = torch.randn(10, 64)
    hf["classifier.bias"] = torch.randn(10)
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(hf, str(path))
    else:
        torch.save(hf, path)
    dst = build_mit("mit_b0", **_mit_kwargs(tiny_model_kwargs))
    info = load_checkpoint(dst, path)
    assert info["format"] == "hf" and sorted(info["dropped"]) == ["classifier.bias", "classifier.weight"]
    assert _same_outputs(src, dst, IMG)
    back, _ = hf_to_mit_state_dict(hf)
    assert back.keys() == src.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in src.state_dict().items())


def test_hf_incomplete_kv(tiny_model_kwargs):
    src = build_mit("mit_b0", **_mit_kwargs(tiny_model_kwargs))
    hf = mit_to_hf_state_dict(src.state_dict())
    del hf["segformer.encoder.block.1.0.attention.self.value.bias"]
    with pytest.raises(CheckpointError, match="key and value"):
        load_checkpoint(src, hf)


# ------------------------------------------------------------------------------------- bad inputs


class _CreatesFile:
    """Unpickling this object would call open(path, "w"), i.e. create a file on disk."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_needing_code_is_refused(tmp_path, tiny_model_kwargs):
    victim = tmp_path / "created_by_unpickling.txt"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _tiny(tiny_model_kwargs, 1).state_dict(), "x": _CreatesFile(victim)}, path)
    with pytest.raises(CheckpointError, match="--allow-pickle") as e:
        read_checkpoint(path)
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_checkpoint(_tiny(tiny_model_kwargs, 1), path)
    assert not victim.exists()


def test_allow_pickle_reads_trusted_objects(tmp_path, tiny_model_kwargs):
    path = tmp_path / "trusted.pth"
    student = _tiny(tiny_model_kwargs, 1)
    torch.save({"state_dict": {"model." + k: v for k, v in student.state_dict().items()},
                "meta": {"when": argparse.Namespace(a=1)}}, path)
    with pytest.raises(CheckpointError, match="argparse.Namespace"):
        read_checkpoint(path)
    dst = _tiny(tiny_model_kwargs, 2)
    load_checkpoint(dst, path, allow_pickle=True)
    assert _same_outputs(student, dst, IMG)


@pytest.mark.parametrize("content", ["half", "garbage", "empty"])
def test_truncated_or_garbage(tmp_path, tiny_model_kwargs, content):
    good = tmp_path / "good.pth"
    torch.save({"state_dict": _tiny(tiny_model_kwargs, 1).state_dict()}, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.pth"
    variants = {"half": data[: len(data) // 2], "garbage": b"\x80\x02not a pickle" * 10, "empty": b""}
    bad.write_bytes(variants[content])
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint") as e:
        read_checkpoint(bad)
    assert str(bad) in str(e.value)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        read_checkpoint(bad_st)


def test_missing_file_and_non_dict(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a dict"):
        read_checkpoint(tmp_path / "list.pth")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a MiT .* checkpoint.*foo.weight"):
        load_checkpoint(build_mit("mit_b0", depths=[1, 1, 1, 1]), tmp_path / "other.pth")


def test_wrong_class_count(tmp_path, tiny_model_kwargs):
    path = tmp_path / "c4.pth"
    sd = {"model." + k: v for k, v in _tiny(tiny_model_kwargs, 1).state_dict().items()}
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match="checkpoint has 4 classes, model has 5") as e:
        load_checkpoint(_tiny(tiny_model_kwargs, 2, num_classes=5), path)
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError, match=f"^{path}: .*checkpoint has 4 classes"):
        load_checkpoint(_tiny(tiny_model_kwargs, 2, num_classes=5), read_checkpoint(path), source=path)


def test_other_architecture(tmp_path, tiny_model_kwargs):
    path = tmp_path / "wide.pth"
    wide = _tiny(tiny_model_kwargs, 1, embed_dims=[16, 32, 64, 128], depths=[1, 1, 2, 1])
    torch.save(wide.state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(_tiny(tiny_model_kwargs, 2), path)
    msg = str(e.value)
    assert "shape mismatches" in msg and "backbone.patch_embed1.proj.weight" in msg
    assert "unexpected keys" in msg and "backbone.block3.1." in msg
    assert "embed_dims [16, 32, 64, 128]" in msg and str(path) in msg
    # a b0-like official file into a bigger backbone
    src = build_mit("mit_b0", **_mit_kwargs(tiny_model_kwargs)).state_dict()
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(build_mit("mit_b0", depths=[1, 1, 1, 1]), src)


def test_missing_and_unexpected_keys(tiny_model_kwargs):
    sd = dict(_tiny(tiny_model_kwargs, 1).state_dict())
    removed = dict(sd)
    del removed["decode_head.conv_seg.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing keys \(decode_head.conv_seg.bias\)"):
        load_checkpoint(_tiny(tiny_model_kwargs, 2), removed)
    extra = {**sd, "decode_head.extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \(decode_head.extra.weight\)"):
        load_checkpoint(_tiny(tiny_model_kwargs, 2), extra)
    # a missing BN counter is tolerated (it does not change any output)
    no_counter = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    dst = _tiny(tiny_model_kwargs, 2)
    load_checkpoint(dst, no_counter)
    assert _same_outputs(_tiny(tiny_model_kwargs, 1), dst, IMG)


def test_strip_prefix():
    sd = {"module.a": 1, "b": 2}
    assert strip_prefix(sd) == {"a": 1, "b": 2}
    assert strip_prefix(sd, "x.") == sd

"""HRDA end to end on CPU: ``dida train synth_mic_hrda``, ``dida test`` / ``dida infer`` (with ``--hrda-out``),
``dida bank build`` from the HRDA checkpoint, and the full-size HRDA presets run at tiny sizes."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.testing import assert_close

from dida.cli import main
from dida.config import load_config
from dida.engine.train import train


@pytest.fixture(scope="module")
def data_root(fake_data) -> Path:
    return fake_data / "tiny_cpu"  # GTA-like 192x108 and Cityscapes-like 256x128 (2:1) images


def roots(data_root: Path) -> list[str]:
    return [f"data.source.root={data_root / 'gta'}", f"data.target.root={data_root / 'cs'}",
            f"data.val.root={data_root / 'cs'}"]


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory) -> Path:
    """Two iterations of ``dida train synth_mic_hrda`` (its real sizes: 128x128 crops of 256x128 images)."""
    run_dir = tmp_path_factory.mktemp("synth_mic_hrda") / "run"
    assert main(["train", "synth_mic_hrda", f"run.dir={run_dir}", *roots(data_root), "train.max_iters=2",
                 "train.eval_interval=2", "train.checkpoint_interval=2", "data.num_workers=0", "run.device=cpu",
                 "train.log_interval=1"]) == 0
    return run_dir


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_synth_mic_hrda(run):
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["iter"] for r in rows] == [1, 2]
    for r in rows:
        assert {"loss/src_ce", "loss/mix_ce", "loss/mic", "stat/mic_detail"} <= set(r)
        assert all(np.isfinite(v) for v in r.values())
    assert 0.0 <= read_jsonl(run / "eval.jsonl")[-1]["mIoU"] <= 1.0
    ckpt = torch.load(run / "latest.pth", weights_only=True)
    assert any(k.startswith("decode_head.scale_attention.") for k in ckpt["model"])


def test_dida_test_with_batched_slide_and_hrda_outputs(run, tmp_path, monkeypatch, capsys):
    inference_module = importlib.import_module("dida.models.inference")  # the package re-exports the function
    calls = []
    original = inference_module.slide_logits

    def spy(*args, **kwargs):
        calls.append(kwargs.get("batched"))
        return original(*args, **kwargs)

    monkeypatch.setattr(inference_module, "slide_logits", spy)
    ckpt = str(run / "latest.pth")
    assert main(["test", str(run), ckpt, "--device", "cpu", "--out", str(tmp_path / "fused"), "--limit", "2"]) == 0
    fused = json.loads((tmp_path / "fused" / "metrics.json").read_text())
    assert fused["mode"] == "slide" and fused["hrda_out"] is None and fused["num_images"] == 2
    assert calls == [True] * 2  # eval.batched_slide of the preset reaches the evaluation
    for out in ("lr", "hr"):
        assert main(["test", str(run), ckpt, "--device", "cpu", "--out", str(tmp_path / out), "--hrda-out", out,
                     "--save-preds", "--format", "trainid", "--limit", "1"]) == 0
        metrics = json.loads((tmp_path / out / "metrics.json").read_text())
        assert metrics["hrda_out"] == out and 0 <= metrics["mIoU"] <= 1
        assert len(list((tmp_path / out / "preds" / "trainid").rglob("*.png"))) == 1
    assert main(["test", str(run), ckpt, "--device", "cpu", "--out", str(tmp_path / "att"), "--hrda-out", "att",
                 "--limit", "2"]) == 0
    maps = sorted((tmp_path / "att" / "attention").rglob("*_attention.png"))
    assert len(maps) == 2 and not (tmp_path / "att" / "metrics.json").exists()
    att = cv2.imread(str(maps[0]), cv2.IMREAD_UNCHANGED)
    assert att.dtype == np.uint8 and att.shape == (128, 256) and att.max() > 0
    assert "attention maps" in capsys.readouterr().out


def test_batched_and_windowed_slide_agree(run):
    from dida.checkpoint import load_checkpoint
    from dida.models import build_model, inference

    cfg = load_config(str(run))
    model = build_model(cfg.model)
    load_checkpoint(model, str(run / "latest.pth"))
    model.eval()
    img = torch.randn(1, 3, 128, 256, generator=torch.Generator().manual_seed(0))
    kw = {"mode": "slide", "crop_size": cfg.eval.crop_size, "stride": cfg.eval.stride}
    assert_close(inference(model, img, batched_slide=True, **kw), inference(model, img, batched_slide=False, **kw),
                 rtol=1e-4, atol=1e-5)


def test_dida_infer_with_hrda_outputs(run, data_root, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((data_root / "cs" / "leftImg8bit" / "val").rglob("*.png"))[:2]:
        shutil.copy(p, images / p.name)
    ckpt = str(run / "latest.pth")
    # 200x100: not a multiple of HRDA's 8-px context cell, so the input is padded and the prediction cropped
    assert main(["infer", ckpt, str(images), "--out", str(tmp_path / "fused"), "--device", "cpu",
                 "--img-scale", "200", "100"]) == 0
    preds = sorted((tmp_path / "fused").glob("*_labelTrainIds.png"))
    assert len(preds) == 2 and cv2.imread(str(preds[0]), cv2.IMREAD_UNCHANGED).shape == (128, 256)
    assert main(["infer", ckpt, str(images), "--out", str(tmp_path / "hr"), "--device", "cpu", "--img-scale", "256",
                 "128", "--hrda-out", "hr"]) == 0
    assert len(list((tmp_path / "hr").glob("*_pred.png"))) == 2
    assert main(["infer", ckpt, str(images), "--out", str(tmp_path / "att"), "--device", "cpu", "--img-scale",
                 "200", "100", "--hrda-out", "att"]) == 0
    maps = sorted((tmp_path / "att").glob("*_attention.png"))
    assert len(maps) == 2 and not list((tmp_path / "att").glob("*_pred.png"))
    assert cv2.imread(str(maps[0]), cv2.IMREAD_UNCHANGED).shape == (128, 256)


def test_hrda_out_needs_an_hrda_checkpoint(data_root, tmp_path, capsys):
    from dida.checkpoint import save_checkpoint
    from dida.config import to_yaml
    from dida.models import build_model

    cfg = load_config("tiny_cpu", roots(data_root))
    path = tmp_path / "daformer.pth"
    save_checkpoint(path, {"model": build_model(cfg.model).state_dict(), "ema_model": None, "iteration": 0,
                           "config": to_yaml(cfg)})
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert main(["test", str(tmp_path), str(path), "--device", "cpu", "--hrda-out", "lr"]) == 2
    assert "not an HRDA model" in capsys.readouterr().err
    assert main(["infer", str(path), str(data_root / "cs" / "leftImg8bit"), "--out", str(tmp_path / "o"),
                 "--recursive", "--device", "cpu", "--hrda-out", "att"]) == 2
    assert "not an HRDA model" in capsys.readouterr().err


def test_bank_build_from_the_hrda_checkpoint(run, data_root, tmp_path, capsys):
    from dida.commands.bank import default_scale
    from dida.models import build_model
    from dida.uda.instance_bank import InstanceBank

    out = tmp_path / "bank"
    # 128x72: 72 rows are not a multiple of the 8-px context cell: padded, the padding ignored
    assert main(["bank", "build", str(run / "latest.pth"), "--data", str(data_root / "gta"), "--dataset", "gta",
                 "--size", "6", "--out", str(out), "--device", "cpu", "--img-scale", "128", "72"]) == 0
    assert "entries per class" in capsys.readouterr().out
    bank = InstanceBank.from_npz(out / "f_buffer_s.npz", out / "l_buffer_s.npz", num_classes=19)
    assert bank.features.shape == (6, 128)  # the synthetic HRDA model's decoder width
    assert (bank.features >= 0).all() and bank.features.abs().sum() > 0  # post-ReLU context embeddings
    # without --img-scale: the HR pipeline's scale, whose context branch sees DAFormer's 1280x720
    hrda = build_model(load_config(str(run)).model)
    assert default_scale(hrda, "gta") == (2560, 1440) and default_scale(hrda, "synthia") == (2560, 1520)
    daformer = build_model(load_config("tiny_cpu").model)
    assert default_scale(daformer, "gta") == (1280, 720)


# ---------------------------------------------------------------- the full-size presets at tiny sizes

TINY = ["model.backbone=mit_b0", "model.pretrained=null", "model.embed_dims=[8,16,32,64]",
        "model.num_heads=[1,1,1,1]", "model.depths=[1,1,1,1]", "model.decoder_channels=16",
        "model.hrda.detail_crop_size=[32,32]", "model.hrda.attention_embed_dim=16",
        "data.source.img_scale=[128,72]", "data.source.crop_size=[64,64]", "data.target.img_scale=[128,64]",
        "data.target.crop_size=[64,64]", "data.val.img_scale=[128,64]", "data.rcs.min_pixels=50",
        "data.num_workers=0", "uda.mic.block_size=8", "uda.bank.init=random", "uda.bank.size=19",
        "uda.bank.update_interval=2", "eval.crop_size=[64,64]", "eval.stride=[32,32]", "run.device=cpu",
        "run.deterministic=true", "train.log_interval=1"]


def test_gta2cs_mic_hrda_runs_in_bf16_with_checkpointing_and_resumes_exactly(data_root, tmp_path):
    """The preset's structure (HR pipeline with the validity mask on the reference canvas, RCS, FD, MIC, slide
    evaluation, checkpoint at the end) at tiny sizes; bf16 autocast with activation checkpointing; a resumed
    run reproduces the uninterrupted one bit for bit."""
    extra = ["train.amp=bf16", "model.hrda.checkpoint_backbone=true", "train.max_iters=3", "train.eval_interval=3",
             "train.checkpoint_interval=2", "train.keep_last=2"]
    full = train(load_config("gta2cs_mic_hrda", [f"run.dir={tmp_path / 'full'}", *roots(data_root), *TINY, *extra]))
    rows = read_jsonl(full / "metrics.jsonl")
    assert all({"loss/src_ce", "loss/feat_dist", "loss/mix_ce", "loss/mic"} <= set(r) for r in rows)
    assert all(np.isfinite(v) for r in rows for v in r.values())
    assert read_jsonl(full / "eval.jsonl")[-1]["iter"] == 3
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(full / "config.yaml", part)
    shutil.copy(full / "iter_2.pth", part / "latest.pth")
    assert main(["train", "--resume", str(part)]) == 0
    a = torch.load(full / "latest.pth", weights_only=True)
    b = torch.load(part / "latest.pth", weights_only=True)
    for key in ("model", "ema_model"):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key]), key
    resumed = read_jsonl(part / "metrics.jsonl")
    assert [r["iter"] for r in resumed] == [3]  # the interrupted copy has no log: only the rows it wrote
    timing = ("time", "mem/")  # wall-clock and memory fields differ between any two runs
    assert ({k: v for k, v in resumed[-1].items() if not k.startswith(timing)}
            == {k: v for k, v in rows[-1].items() if not k.startswith(timing)})


def test_gta2cs_dida_mic_hrda_runs(data_root, tmp_path):
    cfg = load_config("gta2cs_dida_mic_hrda", [f"run.dir={tmp_path / 'run'}", *roots(data_root), *TINY,
                                               "train.max_iters=2", "train.eval_interval=0",
                                               "uda.pseudo_threshold=0.0"])
    assert cfg.model.segmentor == "hrda" and cfg.uda.dual_level.enabled and cfg.uda.mic.enabled
    run = train(cfg)
    for row in read_jsonl(run / "metrics.jsonl"):
        assert np.isfinite(row["loss/instance"]) and np.isfinite(row["loss/mic"]) and row["loss/mic"] > 0
    ckpt = torch.load(run / "latest.pth", weights_only=True)
    assert ckpt["terms"]["dual_level"]["bank.features"].shape == (19, 16)
    assert list((run).glob("iter_*.pth")) == [run / "iter_2.pth"]  # checkpoint_interval 0: only at the end

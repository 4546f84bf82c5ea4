"""``dida test`` end to end on a tiny generated Cityscapes split, checked against cityscapesscripts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dida.cli import main
from dida.constants import CITYSCAPES_CLASSES, PALETTE
from dida.engine.evaluate import evaluate, segmentation_metrics

NUM_VAL = 3


def _write_config(path: Path, model_kwargs: dict, data_root: Path, **extra) -> Path:
    model = {k: v for k, v in model_kwargs.items()}
    model["num_classes"] = 19
    cfg = {
        "model": model,
        "data": {"num_workers": 0, "val": {"kind": "cityscapes", "root": str(data_root), "split": "val",
                                           "img_scale": [128, 64]}},
        "eval": {"mode": "whole", "crop_size": [32, 32], "stride": [21, 21]},
    }
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fake_data):
    """A 3-image Cityscapes val split, a config for the tiny 19-class model and a dida checkpoint."""
    from dida.checkpoint import save_checkpoint
    from dida.config import load_config, to_yaml
    from dida.models import build_model

    tmp = tmp_path_factory.mktemp("dida_test")
    root = fake_data / "formats" / "cityscapes"  # 128x64, NUM_VAL images in val
    kwargs = dict(backbone="mit_b0", embed_dims=[8, 16, 32, 64], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1],
                  decoder_channels=16)
    cfg_path = _write_config(tmp / "tiny.yaml", kwargs, root)
    cfg = load_config(str(cfg_path))
    gen = torch.Generator().manual_seed(0)
    model = build_model(cfg.model, generator=gen)
    ema = build_model(cfg.model, generator=gen)
    with torch.no_grad():
        # A large classifier makes the untrained model predict many classes (a non-trivial test).
        model.decode_head.conv_seg.weight.normal_(0.0, 3.0, generator=gen)
        model.decode_head.conv_seg.bias.normal_(0.0, 0.3, generator=gen)
    ckpt = tmp / "run" / "iter_10.pth"
    ckpt.parent.mkdir()
    save_checkpoint(ckpt, {"model": model.state_dict(), "ema_model": ema.state_dict(), "iteration": 10,
                           "config": to_yaml(cfg)})
    (ckpt.parent / "config.yaml").write_text(to_yaml(cfg))  # a run directory, as the engine writes it
    return {"root": root, "cfg": cfg_path, "ckpt": ckpt, "tmp": tmp, "model": model, "config": cfg}


def _gt_paths(root: Path, suffix: str) -> list[Path]:
    return sorted((root / "gtFine" / "val").rglob(f"*{suffix}"))


def test_dida_test_end_to_end(setup, capsys):
    out = setup["tmp"] / "out_all"
    rc = main(["test", str(setup["cfg"]), str(setup["ckpt"]), "--out", str(out), "--save-preds",
               "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "road" in printed and "mIoU16" not in printed  # not SYNTHIA

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == NUM_VAL
    assert set(metrics["per_class"]) == set(CITYSCAPES_CLASSES)
    assert (out / "iou.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The saved train-id maps, scored independently, reproduce metrics.json.
    gts = _gt_paths(setup["root"], "_gtFine_labelTrainIds.png")
    preds = [out / "preds" / "trainid" / "aachen" / p.name.replace("_gtFine_labelTrainIds", "_labelTrainIds")
             for p in gts]
    pred_maps = [np.asarray(Image.open(p)) for p in preds]
    gt_maps = [np.asarray(Image.open(p)) for p in gts]
    assert pred_maps[0].shape == gt_maps[0].shape == (64, 128)
    assert len(np.unique(np.concatenate([p.ravel() for p in pred_maps]))) > 2  # a non-trivial prediction
    ref = segmentation_metrics(pred_maps, gt_maps, num_classes=19)
    assert metrics["mIoU"] == pytest.approx(ref["mIoU"])
    assert metrics["aAcc"] == pytest.approx(ref["aAcc"])
    for i, name in enumerate(CITYSCAPES_CLASSES):
        got = metrics["per_class"][name]["IoU"]
        assert (got is None) == bool(np.isnan(ref["IoU"][i]))
        if got is not None:
            assert got == pytest.approx(ref["IoU"][i])

    # Colour PNGs are the palette of the train ids, named like the input image (the reference's --show-dir).
    colour = np.asarray(Image.open(out / "preds" / "color" / "aachen" / gts[0].name.replace(
        "_gtFine_labelTrainIds", "_leftImg8bit")).convert("RGB"))
    np.testing.assert_array_equal(colour, np.asarray(PALETTE, dtype=np.uint8)[pred_maps[0]])


def test_cityscapes_label_ids_round_trip_through_official_evaluation(setup, monkeypatch, tmp_path):
    """The exported label-id PNGs scored by cityscapesscripts give the same per-class IoU and mIoU."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval

    out = setup["tmp"] / "out_cs"
    rc = main(["test", str(setup["cfg"]), str(setup["ckpt"]), "--out", str(out), "--save-preds",
               "--format", "cityscapes", "--device", "cpu"])
    assert rc == 0
    assert not (out / "preds" / "trainid").exists() and not (out / "preds" / "color").exists()
    metrics = json.loads((out / "metrics.json").read_text())

    a = cs_eval.args
    monkeypatch.setattr(a, "groundTruthSearch",
                        str(setup["root"] / "gtFine" / "val" / "*" / "*_gtFine_labelIds.png"), raising=False)
    monkeypatch.setattr(a, "predictionPath", str(out / "preds" / "cityscapes"), raising=False)
    monkeypatch.setattr(a, "predictionWalk", None, raising=False)
    monkeypatch.setattr(a, "evalInstLevelScore", False, raising=False)
    monkeypatch.setattr(a, "JSONOutput", False, raising=False)
    monkeypatch.setattr(a, "quiet", True, raising=False)
    monkeypatch.setattr(a, "exportFile", str(tmp_path / "cs.json"), raising=False)
    gts = sorted(str(p) for p in _gt_paths(setup["root"], "_gtFine_labelIds.png"))
    assert len(gts) == NUM_VAL
    preds = [cs_eval.getPrediction(a, gt) for gt in gts]  # the server's file-name matching
    result = cs_eval.evaluateImgLists(preds, gts, a)

    for name in CITYSCAPES_CLASSES:
        theirs, ours = result["classScores"][name], metrics["per_class"][name]["IoU"]
        if np.isnan(theirs):
            assert ours is None, name
        else:
            assert ours == pytest.approx(theirs, abs=1e-12), name
    assert metrics["mIoU"] == pytest.approx(result["averageScoreClasses"], abs=1e-12)


def test_synthia_protocol_limit_ema_and_trainid_only(setup, capsys):
    out = setup["tmp"] / "out_syn"
    rc = main(["test", str(setup["cfg"]), str(setup["ckpt"]), "data.source.kind=synthia", "--out", str(out),
               "--which", "ema_model", "--limit", "1", "--save-preds", "--format", "trainid",
               "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mIoU16" in printed and "mIoU13" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 1 and metrics["which"] == "ema_model"
    assert "mIoU16" in metrics and "mIoU13" in metrics
    assert len(list((out / "preds" / "trainid").rglob("*.png"))) == 1


def test_run_dir_config_default_out_dir_slide_mode_and_bf16(setup):
    rc = main(["test", str(setup["ckpt"].parent), str(setup["ckpt"]), "--mode", "slide", "--amp", "bf16",
               "--device", "cpu", "--limit", "1"])
    assert rc == 0
    metrics = json.loads((setup["ckpt"].parent / "test" / "metrics.json").read_text())
    assert metrics["mode"] == "slide" and metrics["amp"] == "bf16"


def test_evaluate_restores_training_mode_and_matches_cli(setup):
    from dida.data import build_dataset
    from dida.data.uda import ValDataset

    cfg = setup["config"]
    model = setup["model"]
    model.train()
    val = ValDataset(build_dataset(cfg.data.val), cfg.data.val.img_scale)
    seen = []
    result = evaluate(model, val, device="cpu", progress=False, num_classes=19, max_images=2,
                      on_prediction=lambda i, item, pred: seen.append((i, tuple(pred.shape))))
    assert model.training
    assert seen == [(0, (64, 128)), (1, (64, 128))]
    assert result["num_images"] == 2 and 0.0 <= result["mIoU"] <= 1.0 and result["images_per_s"] > 0


def test_bad_inputs_give_clear_errors(setup, capsys, tmp_path):
    # A config that does not exist.
    missing = tmp_path / "nope.yaml"
    assert main(["test", str(missing), str(setup["ckpt"]), "--device", "cpu"]) == 2
    assert str(missing) in capsys.readouterr().err

    # A checkpoint whose class count differs from the config.
    assert main(["test", str(setup["cfg"]), str(setup["ckpt"]), "model.num_classes=4",
                 "uda.feature_distance.classes=[1,2]", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(setup["ckpt"]) in err and "19 classes" in err

    # A missing checkpoint file.
    assert main(["test", str(setup["cfg"]), str(tmp_path / "x.pth"), "--device", "cpu"]) == 2
    assert "x.pth" in capsys.readouterr().err

    # An empty split.
    empty = tmp_path / "empty_cs"
    (empty / "leftImg8bit" / "val").mkdir(parents=True)
    (empty / "gtFine" / "val").mkdir(parents=True)
    argv = ["test", str(setup["cfg"]), str(setup["ckpt"]), "--data-root", str(empty), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "error" in err

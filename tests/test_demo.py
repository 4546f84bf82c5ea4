"""`dida demo --quick`: synthetic data -> convert -> five trainings -> evaluation -> report, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dida.constants import CITYSCAPES_CLASSES


def test_presets_load():
    from dida.config import load_config

    methods = {}
    for name in ("synth_source_only", "synth_daformer", "synth_dida", "synth_mic", "synth_mic_dida"):
        cfg = load_config(name)
        methods[name] = (cfg.uda.self_training, cfg.uda.dual_level.enabled, cfg.uda.mic.enabled)
        assert cfg.model.backbone == "mit_b0" and cfg.model.pretrained is None
        assert not cfg.uda.feature_distance.enabled
        assert cfg.train.eval_interval == cfg.train.max_iters
        assert cfg.data.source.kind == "gta" and cfg.data.val.split == "val"
    assert methods == {"synth_source_only": (False, False, False), "synth_daformer": (True, False, False),
                       "synth_dida": (True, True, False), "synth_mic": (True, False, True),
                       "synth_mic_dida": (True, True, True)}
    assert load_config("synth_dida").uda.bank.init == "random"


def test_format_table_and_colorize():
    from dida.engine.demo import format_table
    from dida.visualize import colorize

    iou = {c: 0.5 for c in CITYSCAPES_CLASSES}
    iou["train"] = None
    table = format_table({"source_only": {"mIoU": 0.5, "IoU": iou}, "dida": {"mIoU": 0.6, "IoU": iou}})
    assert "| train |   n/a |   n/a |" in table and "**60.0**" in table
    rgb = colorize(np.array([[0, 255]], np.uint8))
    assert rgb.tolist() == [[[128, 64, 128], [0, 0, 0]]]


def test_demo_quick_end_to_end(tmp_path: Path):
    pytest.importorskip("matplotlib")
    from dida.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    for name in ("report.md", "results.json", "predictions.png", "iou.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"source_only", "daformer", "dida", "mic", "mic_dida"}
    for r in results.values():
        assert 0.0 <= r["mIoU"] <= 1.0
        assert set(r["IoU"]) == set(CITYSCAPES_CLASSES)
    report = (out / "report.md").read_text()
    assert "predictions.png" in report and "mIoU" in report

    # A second run with the same parameters reuses data and runs.
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert all(again[m]["reused"] for m in again)
    assert {m: again[m]["mIoU"] for m in again} == {m: results[m]["mIoU"] for m in results}

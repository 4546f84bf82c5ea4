"""Rare Class Sampling: probabilities from a hand-made statistics file, candidates, sampling, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dida.data.convert import save_class_stats
from dida.data.rcs import RareClassSampler, class_probabilities
from dida.errors import DataError

STATS = [
    {"0": 5000, "1": 4000, "file": "data/gta/labels/00001_labelTrainIds.png"},
    {"0": 100, "2": 3500, "file": "data/gta/labels/00002_labelTrainIds.png"},
    {"1": 3000, "2": 200, "file": "data/gta/labels/00003_labelTrainIds.png"},
]
# totals: class 0 = 5100, class 1 = 7000, class 2 = 3700 -> ascending order 2, 0, 1


def expected_probs(totals: list[int], temperature: float) -> list[float]:
    total = sum(totals)
    logits = [(1 - n / total) / temperature for n in totals]
    m = max(logits)
    e = [math.exp(v - m) for v in logits]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("temperature", [0.01, 0.1, 1.0])
def test_probabilities_by_hand(temperature):
    classes, probs = class_probabilities([dict(s) for s in STATS], temperature)
    assert classes == [2, 0, 1]
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected_probs([3700, 5100, 7000], temperature), rtol=1e-5, atol=1e-7)


def test_known_values_at_default_temperature():
    # f = (3700, 5100, 7000) / 15800; P ~ exp(-f / 0.01): ratios exp(-1400/158) and exp(-3300/158)
    _, probs = class_probabilities(STATS, 0.01)
    assert probs[0] == pytest.approx(1 / (1 + math.exp(-1400 / 158) + math.exp(-3300 / 158)), rel=1e-5)
    assert probs[1] / probs[0] == pytest.approx(math.exp(-1400 / 158), rel=1e-3)


def test_ties_keep_first_seen_order():
    stats = [{"5": 10, "3": 10, "file": "a"}, {"7": 4, "file": "b"}]
    classes, probs = class_probabilities(stats, 1.0)
    assert classes == [7, 5, 3]
    assert probs[1] == probs[2]


@pytest.fixture
def stats_dir(tmp_path):
    save_class_stats(tmp_path, [dict(s) for s in STATS])
    return tmp_path


def test_from_stats_files_and_min_pixels(stats_dir):
    rcs = RareClassSampler.from_stats(stats_dir, temperature=0.1, min_pixels=3000)
    assert list(rcs.probabilities) == [2, 0, 1]
    assert sum(rcs.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    # strict '>': class 1 of file 00003 has exactly 3000 pixels and is not a candidate
    assert rcs.files == {2: ["00002_labelTrainIds.png"], 0: ["00001_labelTrainIds.png"],
                         1: ["00001_labelTrainIds.png"]}
    json_path = stats_dir / "sample_class_stats.json"
    same = RareClassSampler.from_stats(json_path, temperature=0.1, min_pixels=3000)
    assert same.probabilities == rcs.probabilities
    low = RareClassSampler.from_stats(stats_dir, temperature=0.1, min_pixels=100)
    assert low.files[0] == ["00001_labelTrainIds.png"] and low.files[2] == ["00002_labelTrainIds.png",
                                                                            "00003_labelTrainIds.png"]


def test_sampling_follows_probabilities(stats_dir):
    rcs = RareClassSampler.from_stats(stats_dir, temperature=0.5, min_pixels=100)
    rng = np.random.default_rng(0)
    draws = [rcs.sample(rng) for _ in range(4000)]
    freq = np.array([sum(c == k for c, _ in draws) for k in rcs.classes]) / len(draws)
    np.testing.assert_allclose(freq, rcs.probs, atol=0.03)
    files_of_2 = [f for c, f in draws if c == 2]
    assert 0.4 < files_of_2.count("00002_labelTrainIds.png") / len(files_of_2) < 0.6
    again = [rcs.sample(np.random.default_rng(0)) for _ in range(3)]
    assert again == [draws[0]] * 3


def test_empty_candidate_list_is_an_error(stats_dir):
    with pytest.raises(DataError, match="min_pixels"):
        RareClassSampler.from_stats(stats_dir, min_pixels=6000)


def test_missing_or_bad_statistics(tmp_path):
    with pytest.raises(DataError, match="dida convert"):
        RareClassSampler.from_stats(tmp_path)
    (tmp_path / "sample_class_stats.json").write_text("{broken")
    (tmp_path / "samples_with_class.json").write_text("{}")
    with pytest.raises(DataError, match="sample_class_stats.json"):
        RareClassSampler.from_stats(tmp_path)
    (tmp_path / "sample_class_stats.json").write_text(json.dumps([{"file": "x"}]))
    with pytest.raises(DataError, match="no labelled pixel"):
        RareClassSampler.from_stats(tmp_path)


def test_from_converted_dataset(gta_root):
    rcs = RareClassSampler.from_stats(gta_root, min_pixels=100)
    stats = json.loads((gta_root / "sample_class_stats.json").read_text())
    present = {int(k) for s in stats for k in s if k != "file"}
    assert set(rcs.classes) == present
    totals = [sum(s.get(str(c), 0) for s in stats) for c in rcs.classes]
    assert totals == sorted(totals)

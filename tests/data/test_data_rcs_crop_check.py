"""Rare-class sampling's crop check in ``SourceTargetDataset`` (spec 3.5), on scripted pipelines.

"Up to 10 retries: if #pixels of class c in the cropped label > 3000 * 0.5 = 1500, stop. Otherwise re-run
the pipeline on the same image. The loop body runs at most 10 times, so there are at most 11 pipeline
calls, and the 11th result is accepted without a check."
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dida.data.rcs import RareClassSampler
from dida.data.uda import SourceTargetDataset

CLS = 3
CROP = (64, 64)  # 4096 pixels, more than the 1501 a crop may need


class FakeDataset:
    """Two labelled images; ``load`` records which index was read."""

    def __init__(self, name: str) -> None:
        self.samples = [(f"{name}/img{i}.png", f"{name}/lab{i}_labelTrainIds.png") for i in range(2)]
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        self.loaded.append(index)
        img = np.full((80, 80, 3), index, np.uint8)
        return img, np.zeros((80, 80), np.uint8)


class ScriptedPipeline:
    """``random_part`` returns crops with ``counts[k]`` pixels of ``CLS`` on its k-th call.

    The image of the k-th crop is filled with k, so the returned sample tells which call produced it.
    """

    def __init__(self, counts: list[int]) -> None:
        self.counts = counts
        self.calls: list[int] = []  # the image value (= dataset index) each call was given

    def resize(self, img, label):
        return img, label

    def random_part(self, img, label, rng):
        k = len(self.calls)
        self.calls.append(int(img[0, 0, 0]))
        lab = torch.full(CROP, 255, dtype=torch.int64)
        lab.view(-1)[: self.counts[k]] = CLS
        return torch.full((3, *CROP), float(k)), lab

    def __call__(self, img, label, rng):  # as the target pipeline
        return torch.zeros(3, *CROP), torch.zeros(CROP, dtype=torch.int64)


def make(counts: list[int], min_pixels: int = 3000, min_crop_ratio: float = 0.5):
    # The rare-class statistics name one class in the second image only, so every draw is (CLS, image 1).
    stats = [{str(CLS): 5000, "file": "gta/lab1_labelTrainIds.png"}]
    with_class = {str(CLS): [["gta/lab1_labelTrainIds.png", 5000]]}
    rcs = RareClassSampler(stats, with_class, temperature=0.01, min_pixels=min_pixels)
    source, pipeline = FakeDataset("gta"), ScriptedPipeline(counts)
    ds = SourceTargetDataset(source, FakeDataset("cs"), pipeline, ScriptedPipeline([]), rcs=rcs, seed=0,
                             min_crop_ratio=min_crop_ratio)
    return ds, source, pipeline


def run(counts: list[int], **kw) -> tuple[dict, ScriptedPipeline, FakeDataset]:
    ds, source, pipeline = make(counts, **kw)
    item = ds[0]
    return item, pipeline, source


def produced_by(item: dict) -> int:
    """Index (0-based) of the pipeline call whose crop was returned."""
    return int(item["img"][0, 0, 0])


def test_a_failing_class_reruns_the_pipeline_ten_times_on_the_same_image():
    item, pipeline, source = run([0] * 20)
    assert len(pipeline.calls) == 11  # the first run + 10 re-runs
    assert pipeline.calls == [1] * 11  # always the same image
    assert source.loaded == [1]  # read (and resized) once
    assert produced_by(item) == 10 and item["rcs_class"] == CLS
    assert int((item["label"] == CLS).sum()) == 0  # the 11th result is taken unchecked


def test_the_last_retry_can_still_succeed():
    item, pipeline, _ = run([0] * 10 + [1501] + [0] * 5)
    assert len(pipeline.calls) == 11 and produced_by(item) == 10
    assert int((item["label"] == CLS).sum()) == 1501


@pytest.mark.parametrize(
    "counts, calls",
    [
        ([1501], 1),  # one more pixel than min_pixels * min_crop_ratio = 1500: accepted at once
        ([1500, 1501], 2),  # exactly 1500 is rejected (strict '>')
        ([1500, 1500, 1500, 4096], 4),
        ([1500] * 15, 11),
    ],
)
def test_strict_comparison_with_min_pixels_times_min_crop_ratio(counts, calls):
    item, pipeline, _ = run(counts)
    assert len(pipeline.calls) == calls
    assert produced_by(item) == calls - 1
    assert int((item["label"] == CLS).sum()) == counts[calls - 1]


def test_threshold_follows_min_pixels_and_min_crop_ratio():
    # 200 * 0.25 = 50: 50 pixels are rejected, 51 accepted.
    item, pipeline, _ = run([50, 51, 0], min_pixels=200, min_crop_ratio=0.25)
    assert len(pipeline.calls) == 2 and int((item["label"] == CLS).sum()) == 51
    # A fractional threshold: 3001 * 0.5 = 1500.5, so 1500 is rejected and 1501 accepted.
    item, pipeline, _ = run([1500, 1501, 0], min_pixels=3001, min_crop_ratio=0.5)
    assert len(pipeline.calls) == 2 and int((item["label"] == CLS).sum()) == 1501


def test_no_crop_check_without_a_ratio():
    item, pipeline, _ = run([0, 4096], min_crop_ratio=0.0)
    assert len(pipeline.calls) == 1 and produced_by(item) == 0

"""Metrics against hand-computed cases and against a per-image mmseg-0.16 reference written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dida.constants import NUM_CLASSES, SYNTHIA_13_CLASSES, SYNTHIA_16_CLASSES
from dida.engine.evaluate import MetricAccumulator, segmentation_metrics


def mmseg_reference(preds, labels, num_classes, ignore_index=255):
    """mmseg 0.16 ``eval_metrics``: per image drop GT==ignore, histc of I/P/L, accumulate float64."""
    total = {k: torch.zeros(num_classes, dtype=torch.float64) for k in ("i", "u", "p", "l")}
    for pred, label in zip(preds, labels):
        pred = torch.as_tensor(np.asarray(pred)).long()
        label = torch.as_tensor(np.asarray(label)).long()
        mask = label != ignore_index
        pred, label = pred[mask], label[mask]
        inter = pred[pred == label]
        ai, ap, al = (torch.histc(x.float(), bins=num_classes, min=0, max=num_classes - 1).double()
                      for x in (inter, pred, label))
        total["i"] += ai
        total["p"] += ap
        total["l"] += al
        total["u"] += ap + al - ai
    iou = (total["i"] / total["u"]).numpy()
    acc = (total["i"] / total["l"]).numpy()
    a_acc = float(total["i"].sum() / total["l"].sum())
    return a_acc, iou, acc


def test_hand_computed_case_with_ignore():
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    label = np.array([[0, 1, 2], [2, 255, 1]])  # the ignored pixel is predicted 2 and must not count
    m = segmentation_metrics([pred], [label], num_classes=3)
    np.testing.assert_allclose(m["IoU"], [1 / 2, 1 / 3, 1 / 2])
    np.testing.assert_allclose(m["Acc"], [1.0, 1 / 2, 1 / 2])
    np.testing.assert_allclose(m["area_pred"], [2, 2, 1])
    np.testing.assert_allclose(m["area_label"], [1, 2, 2])
    assert m["aAcc"] == pytest.approx(3 / 5)
    assert m["mIoU"] == pytest.approx(4 / 9)
    assert m["num_pixels"] == 5
    assert m["IoU"].dtype == np.float64 and isinstance(m["aAcc"], float)


def test_absent_classes_are_nan_and_excluded_from_the_mean():
    # 4 classes: class 3 never appears (NaN); class 2 is predicted but has no GT (IoU 0, Acc NaN).
    pred = np.array([[0, 0, 1, 2]])
    label = np.array([[0, 0, 1, 1]])
    m = segmentation_metrics([pred], [label], num_classes=4)
    assert m["IoU"][0] == 1.0 and m["IoU"][1] == pytest.approx(0.5) and m["IoU"][2] == 0.0
    assert math.isnan(m["IoU"][3])
    assert math.isnan(m["Acc"][2]) and math.isnan(m["Acc"][3])
    assert m["mIoU"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert m["mAcc"] == pytest.approx((1.0 + 0.5) / 2)
    # 16/13-class means need the 19-class setting.
    assert math.isnan(m["mIoU16"]) and math.isnan(m["mIoU13"])


def test_everything_ignored_gives_nan_not_an_error():
    m = segmentation_metrics([np.zeros((2, 2), np.uint8)], [np.full((2, 2), 255, np.uint8)], num_classes=3)
    assert math.isnan(m["aAcc"]) and math.isnan(m["mIoU"]) and np.isnan(m["IoU"]).all()


def test_accumulation_over_images_is_not_per_image_averaging():
    # Image 1: 4 correct pixels of class 0. Image 2: one class-0 pixel predicted as class 1.
    preds = [np.zeros((2, 2), np.int64), np.ones((1, 1), np.int64)]
    labels = [np.zeros((2, 2), np.int64), np.zeros((1, 1), np.int64)]
    m = segmentation_metrics(preds, labels, num_classes=2)
    np.testing.assert_allclose(m["IoU"], [4 / 5, 0.0])
    assert m["mIoU"] == pytest.approx(0.4)
    per_image = [segmentation_metrics([p], [g], num_classes=2)["mIoU"] for p, g in zip(preds, labels)]
    assert np.mean(per_image) == pytest.approx(0.5)  # what averaging per image would (wrongly) report
    assert m["aAcc"] == pytest.approx(4 / 5)


def test_synthia_16_and_13_class_means():
    # Every class has GT; the three classes SYNTHIA lacks are never predicted (IoU 0), as in the reference.
    label = np.arange(NUM_CLASSES).reshape(1, -1).repeat(2, axis=0)
    pred = label.copy()
    for c in (9, 14, 16):
        pred[:, c] = 255  # predicted as nothing valid: counts for no class
    m = segmentation_metrics([pred], [label])
    assert m["mIoU"] == pytest.approx(16 / 19)
    assert m["mIoU16"] == pytest.approx(m["mIoU"] * 19 / 16) and m["mIoU16"] == pytest.approx(1.0)
    assert m["mIoU13"] == pytest.approx(1.0)
    # Now wall (3) is missed too: it counts in mIoU16 but not in mIoU13.
    pred[:, 3] = 255
    m = segmentation_metrics([pred], [label])
    assert m["mIoU16"] == pytest.approx(15 / 16)
    assert m["mIoU13"] == pytest.approx(1.0)
    # And a miss on a 13-class member.
    pred[:, 0] = 255
    m = segmentation_metrics([pred], [label])
    assert m["mIoU16"] == pytest.approx(14 / 16)
    assert m["mIoU13"] == pytest.approx(12 / 13)
    expected16 = np.nanmean(m["IoU"][list(SYNTHIA_16_CLASSES)])
    expected13 = np.nanmean(m["IoU"][list(SYNTHIA_13_CLASSES)])
    assert m["mIoU16"] == pytest.approx(expected16) and m["mIoU13"] == pytest.approx(expected13)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_mmseg_reference_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    num_classes = 5
    preds, labels = [], []
    for _ in range(3):
        h, w = rng.integers(3, 9, size=2)
        # Labels include ignore (255) and out-of-range ids (5..7) that mmseg's histc silently drops.
        labels.append(rng.choice([0, 1, 2, 3, 4, 5, 7, 255], size=(h, w)).astype(np.uint8))
        preds.append(rng.integers(0, num_classes, size=(h, w)))
    a_acc, iou, acc = mmseg_reference(preds, labels, num_classes)
    m = segmentation_metrics(preds, labels, num_classes=num_classes)
    np.testing.assert_allclose(m["IoU"], iou, equal_nan=True)
    np.testing.assert_allclose(m["Acc"], acc, equal_nan=True)
    assert m["aAcc"] == pytest.approx(a_acc)
    assert m["out_of_range_label_pixels"] == sum(int(((g >= 5) & (g != 255)).sum()) for g in labels)


def test_accumulator_torch_batches_merge_and_reset():
    gen = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 3, (4, 5, 6), generator=gen)
    labels = torch.randint(0, 4, (4, 5, 6), generator=gen)
    labels[labels == 3] = 255
    expected = segmentation_metrics(list(preds.numpy()), list(labels.numpy()), num_classes=3)

    batched = MetricAccumulator(3, 255)
    batched.update(preds, labels)  # one [B, H, W] update
    assert batched.num_images == 4
    np.testing.assert_allclose(batched.compute()["IoU"], expected["IoU"], equal_nan=True)

    a, b = MetricAccumulator(3), MetricAccumulator(3)
    a.update(preds[:2], labels[:2].to(torch.uint8))
    b.update(preds[2:].to(torch.int32), labels[2:])
    a.merge(b)
    np.testing.assert_allclose(a.compute()["IoU"], expected["IoU"], equal_nan=True)
    cm = a.confusion_matrix
    assert cm.shape == (3, 3) and int(cm.sum()) == expected["num_pixels"]
    a.all_reduce()  # not distributed: a no-op
    a.reset()
    assert a.num_images == 0 and int(a.confusion_matrix.sum()) == 0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics([np.zeros((2, 3))], [np.zeros((3, 2))], num_classes=2)


@pytest.mark.gpu
def test_accumulator_on_cuda_matches_cpu_without_host_syncs():
    gen = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 6, (3, 64, 96), generator=gen)
    labels = torch.randint(0, 7, (3, 64, 96), generator=gen)
    labels[labels == 6] = 255
    cpu = segmentation_metrics(list(preds), list(labels), num_classes=6)
    acc = MetricAccumulator(6, device="cuda")
    preds_d, labels_d = preds.cuda(), labels.to(torch.uint8).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call inside update raises
    try:
        for p, g in zip(preds_d, labels_d):
            acc.update(p, g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    np.testing.assert_allclose(acc.compute()["IoU"], cpu["IoU"], equal_nan=True)

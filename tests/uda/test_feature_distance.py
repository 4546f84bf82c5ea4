from __future__ import annotations

import pytest
import torch

from dida.uda.feature_distance import downscale_label_ratio, feature_distance_loss, thing_mask


def _naive_downscale(labels, scale, min_ratio, num_classes):
    b, h, w = labels.shape
    out = torch.full((b, h // scale, w // scale), 255, dtype=torch.long)
    for i in range(b):
        for y in range(h // scale):
            for x in range(w // scale):
                cell = labels[i, y * scale:(y + 1) * scale, x * scale:(x + 1) * scale].flatten()
                cell = torch.where(cell == 255, torch.tensor(num_classes), cell)
                counts = torch.bincount(cell, minlength=num_classes + 1).float() / cell.numel()
                best = int(counts.argmax())
                if best != num_classes and counts[best] >= min_ratio:
                    out[i, y, x] = best
    return out


def test_downscale_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    labels[0, :4, :4] = 1
    labels[1, 4:, :4] = 255
    labels[1, :4, 4:] = 2
    labels[1, 0, 4] = 0  # 15/16 = 0.9375 purity
    for ratio in (0.0, 0.75, 0.95):
        got = downscale_label_ratio(labels, 4, ratio, 3)
        torch.testing.assert_close(got, _naive_downscale(labels, 4, ratio, 3))


def test_thing_mask_on_drawn_example():
    # 4x4 label, scale 2 -> 2x2 cells: [thing 6 (pure), 6 with 1/4 road], [255 majority, road]
    labels = torch.tensor([[[6, 6, 6, 0],
                            [6, 6, 6, 6],
                            [255, 255, 0, 0],
                            [255, 13, 0, 0]]])
    mask = thing_mask(labels, 2, 0.75, 19, (6, 7, 13))
    assert mask.tolist() == [[[True, True], [False, False]]]
    mask = thing_mask(labels, 2, 0.8, 19, (6, 7, 13))
    assert mask.tolist() == [[[True, False], [False, False]]]


def test_feature_distance_loss_value_and_grad():
    g = torch.Generator().manual_seed(0)
    f1 = torch.randn(2, 5, 3, 3, generator=g, requires_grad=True)
    f2 = torch.randn(2, 5, 3, 3, generator=g)
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[0, 1, 1] = mask[1, 0, 2] = True
    loss = feature_distance_loss(f1, f2, mask, weight=0.005)
    d = (f1 - f2).norm(dim=1)
    torch.testing.assert_close(loss, 0.005 * (d[0, 1, 1] + d[1, 0, 2]) / 2)
    loss.backward()
    assert torch.isfinite(f1.grad).all() and f1.grad[0, :, 0, 0].eq(0).all()


def test_feature_distance_empty_mask_modes():
    f1 = torch.randn(1, 4, 2, 2, requires_grad=True)
    f2 = torch.randn(1, 4, 2, 2)
    empty = torch.zeros(1, 2, 2, dtype=torch.bool)
    z = feature_distance_loss(f1, f2, empty, empty="zero")
    assert z.item() == 0.0
    z.backward()
    assert f1.grad is not None and f1.grad.eq(0).all()
    f1.grad = None
    n = feature_distance_loss(f1, f2, empty, empty="nan")
    assert torch.isnan(n)
    n.backward()  # reference: NaN logged, no gradient flows
    assert f1.grad is None or f1.grad.eq(0).all()


def test_feature_distance_zero_difference_has_finite_grad():
    f = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = feature_distance_loss(f, f.detach().clone(), torch.ones(1, 2, 2, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(f.grad).all()


def test_feature_distance_mask_shape_mismatch():
    with pytest.raises(ValueError):
        feature_distance_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2),
                              torch.ones(1, 3, 3, dtype=torch.bool))

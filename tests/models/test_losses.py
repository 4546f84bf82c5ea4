from __future__ import annotations

import torch
import torch.nn.functional as F

from dida.models.losses import seg_accuracy, seg_ce


def test_seg_ce_mean_over_all_pixels_including_ignored():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    labels = torch.randint(0, 3, (2, 4, 5), generator=g)
    labels[0, 0, :] = 255
    per_pixel = F.cross_entropy(logits, labels, reduction="none", ignore_index=255)
    expected = per_pixel.sum() / labels.numel()
    torch.testing.assert_close(seg_ce(logits, labels), expected)
    # Differs from torch's default 'mean' (which excludes ignored pixels).
    assert not torch.allclose(seg_ce(logits, labels), F.cross_entropy(logits, labels, ignore_index=255))


def test_seg_ce_weighted():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, 3, 3, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (1, 3, 3), generator=g)
    weight = torch.rand(1, 3, 3, generator=g)
    loss = seg_ce(logits, labels, weight)
    manual = (F.cross_entropy(logits, labels, reduction="none") * weight).mean()
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_seg_ce_size_mismatch_raises():
    import pytest

    with pytest.raises(ValueError):
        seg_ce(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 3, dtype=torch.long))


def test_seg_accuracy_counts_ignored_pixels_in_denominator():
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 1] = 1.0  # predicts class 1 everywhere
    labels = torch.tensor([[[1, 1, 0, 255]]])
    torch.testing.assert_close(seg_accuracy(logits, labels), torch.tensor(50.0))

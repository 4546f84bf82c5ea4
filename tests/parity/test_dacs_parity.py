"""Fixed expected values derived by hand from the specification (spec sections 4 and 5)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dida.constants import IMG_MEAN, IMG_STD, THING_CLASSES
from dida.models.losses import seg_ce
from dida.uda import augment as A
from dida.uda.ema import EMATeacher
from dida.uda.feature_distance import downscale_label_ratio, thing_mask
from dida.uda.mixing import class_mix_masks
from dida.uda.pseudo_label import pseudo_weight

pytestmark = pytest.mark.parity


def _report(name, got, expected):
    got = torch.as_tensor(got, dtype=torch.float64)
    diff = (got - torch.as_tensor(expected, dtype=torch.float64)).abs().max()
    print(f"{name}: max |diff| = {float(diff):.3e}")


# ---------------------------------------------------------------------------------------------- EMA


def test_ema_schedule_values():
    t = EMATeacher(nn.Linear(1, 1), alpha=0.999)
    expected = {0: 0.0, 1: 0.5, 2: 2 / 3, 998: 998 / 999, 999: 0.999, 1000: 0.999, 39999: 0.999}
    for step, alpha in expected.items():
        assert math.isclose(t.decay(step), alpha, rel_tol=0, abs_tol=1e-12), step


def test_ema_update_value():
    student = nn.Linear(1, 1, bias=False)
    teacher = EMATeacher(student)
    with torch.no_grad():
        student.weight.fill_(2.0)
    teacher.init_from(student)  # step 0: copy -> 2.0
    with torch.no_grad():
        student.weight.fill_(5.0)
    teacher.update(student, 1)  # 0.5 * 2 + 0.5 * 5 = 3.5
    assert float(teacher.model.weight) == 3.5
    teacher.update(student, 2)  # 2/3 * 3.5 + 1/3 * 5 = 4.0
    torch.testing.assert_close(teacher.model.weight, torch.full((1, 1), 4.0))


# ------------------------------------------------------------------------------- pseudo-labels, CE


def test_pseudo_weight_2x2():
    # image 0: [[0.97, 0.50], [0.968, 0.99]] -> 3 confident; image 1: [[0.2, 0.9], [0.96, 0.3]] -> 0.
    conf = torch.tensor([[[0.97, 0.50], [0.968, 0.99]], [[0.2, 0.9], [0.96, 0.3]]])
    w = pseudo_weight(conf, 0.968)
    torch.testing.assert_close(w, torch.full((2, 2, 2), 3 / 8))
    w = pseudo_weight(conf, 0.968, ignore_top=1)
    torch.testing.assert_close(w, torch.tensor([[[0.0, 0.0], [0.375, 0.375]]] * 2))
    w = pseudo_weight(conf, 0.968, ignore_bottom=1)
    torch.testing.assert_close(w, torch.tensor([[[0.375, 0.375], [0.0, 0.0]]] * 2))


def test_ce_averages_over_all_pixels():
    logits = torch.zeros(1, 2, 2, 2)  # uniform over 2 classes: CE = ln 2 per labelled pixel
    labels = torch.tensor([[[0, 1], [255, 1]]])
    torch.testing.assert_close(seg_ce(logits, labels), torch.tensor(3 * math.log(2) / 4))
    weight = torch.tensor([[[1.0, 0.5], [1.0, 0.0]]])
    torch.testing.assert_close(seg_ce(logits, labels, weight), torch.tensor(1.5 * math.log(2) / 4))


def test_classmix_union_quirk_counts():
    # batch union {0, 1, 255}: n = 3 -> ceil(3/2) = 2 values picked for EACH image
    labels = torch.tensor([[[0, 0], [0, 0]], [[1, 255], [1, 1]]])
    for seed in range(10):
        mask = class_mix_masks(labels, torch.Generator().manual_seed(seed))
        # image 1 has values {1, 255}: the two picked values among {0,1,255} cover at least one of them
        assert mask[1].any()
        # picked sets have size 2, so image 0 (only value 0) is fully pasted or not at all
        assert mask[0].all() or not mask[0].any()


# -------------------------------------------------------------------------------- feature distance


def test_thing_mask_drawn_example_scale_32():
    # 64x64 label, scale 32 -> 2x2 cells (rows of 32 px = 1024 px per cell).
    lbl = torch.zeros(1, 64, 64, dtype=torch.long)  # road everywhere
    lbl[0, :24, :32] = 11  # cell (0,0): 24/32 rows person = 0.75 exactly -> kept (>= 0.75)
    lbl[0, :23, 32:] = 13  # cell (0,1): car 23/32 = 0.71875 < 0.75 -> 255
    lbl[0, 32:, :32] = 255  # cell (1,0): all ignore -> 255
    lbl[0, 32:56, :32] = 12  # ... then 24/32 rows rider: rider wins with 0.75 -> kept
    lbl[0, 32:, 32:] = 8  # cell (1,1): vegetation, pure -> 8 (not a thing)
    cells = downscale_label_ratio(lbl, 32, 0.75, 19)
    assert cells.tolist() == [[[11, 255], [12, 8]]]
    mask = thing_mask(lbl, 32, 0.75, 19, THING_CLASSES)
    assert mask.tolist() == [[[True, False], [True, False]]]
    # the ignore channel wins -> 255 even when pure
    lbl2 = torch.full((1, 32, 32), 255, dtype=torch.long)
    assert downscale_label_ratio(lbl2, 32, 0.0, 19).tolist() == [[[255]]]


# ------------------------------------------------------------------------------------------- blur


def test_blur_kernel_size_and_weights():
    assert A.blur_kernel_size(512) == 51
    assert A.blur_kernel_size(256) == 25  # ceil(25.6) = 26 (even): floor(26 - 0.5) = 25
    assert A.blur_kernel_size(1024) == 103  # ceil(102.4) = 103 (odd): floor(103 - 0.5 + 1) = 103
    k = A.gaussian_kernel1d(5, torch.tensor([0.5], dtype=torch.float64))[0]
    expected = torch.tensor([0.00026386508273735414, 0.10645077197359151, 0.7865707258873422,
                             0.10645077197359151, 0.00026386508273735414], dtype=torch.float64)
    _report("gaussian kernel sigma=0.5", k, expected)
    torch.testing.assert_close(k, expected)
    # a centred impulse in a 50x50 image (kernel 5x5) is blurred into the outer product
    x = torch.zeros(1, 1, 50, 50, dtype=torch.float64)
    x[0, 0, 25, 25] = 1.0
    y = A.gaussian_blur(x, torch.tensor([0.5], dtype=torch.float64))
    torch.testing.assert_close(y[0, 0, 23:28, 23:28], expected[:, None] * expected[None, :])


# --------------------------------------------------------------------------------- colour jitter


def _px(r, g, b):
    return torch.tensor([r, g, b], dtype=torch.float32).view(1, 3, 1, 1)


@pytest.mark.parametrize(
    "op, factor, expected",
    [
        (A.adjust_brightness, 1.1, (0.3, 0.6, 1.0)),  # additive +0.1, clamped at 1
        (A.adjust_brightness, 0.8, (0.0, 0.3, 0.7)),  # additive -0.2, clamped at 0
        (A.adjust_contrast, 0.9, (0.18, 0.45, 0.81)),  # multiplicative
        (A.adjust_saturation, 0.8, (0.34, 0.58, 0.9)),  # V - 0.8 (V - x), V = 0.9
        (A.adjust_hue, 0.1, (0.32, 0.2, 0.9)),  # H 214.29 deg + 36 = 250.29 deg
        (A.adjust_hue, -0.1, (0.2, 0.9, 0.88)),  # H 214.29 deg - 36 = 178.29 deg
    ],
)
def test_color_jitter_ops_on_fixed_pixel(op, factor, expected):
    got = op(_px(0.2, 0.5, 0.9), factor).flatten()
    _report(f"{op.__name__}({factor})", got, expected)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=0)


def test_hue_wraps_negative_shift():
    # red (H = 0) shifted by -0.1 turn: fmod gives a negative angle, i.e. 324 deg -> (0.8, 0.1, 0.52)
    got = A.adjust_hue(_px(0.8, 0.1, 0.1), -0.1).flatten()
    torch.testing.assert_close(got, torch.tensor([0.8, 0.1, 0.52]), atol=1e-5, rtol=0)


def test_denorm_renorm_constants():
    rgb = _px(0.2, 0.5, 0.9)
    norm = A.renormalize(rgb)
    expected = [(v * 255 - m) / s for v, m, s in zip((0.2, 0.5, 0.9), IMG_MEAN, IMG_STD)]
    torch.testing.assert_close(norm.flatten(), torch.tensor(expected))
    torch.testing.assert_close(A.denormalize(norm), rgb)

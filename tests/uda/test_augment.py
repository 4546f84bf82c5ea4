from __future__ import annotations

import math

import kornia
import pytest
import torch

from dida.constants import IMG_MEAN, IMG_STD
from dida.uda import augment as A


def _images(seed=0, b=2, h=20, w=24):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(b, 3, h, w, generator=g)
    return A.renormalize(rgb)


def test_denormalize_renormalize_roundtrip_not_in_place():
    x = _images()
    x0 = x.clone()
    rgb = A.denormalize(x)
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5
    torch.testing.assert_close(A.renormalize(rgb), x, atol=1e-4, rtol=0)
    assert torch.equal(x, x0)
    mean = torch.tensor(IMG_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMG_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(rgb, (x * std + mean) / 255)


def test_single_ops_maths():
    x = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1)
    torch.testing.assert_close(A.adjust_brightness(x, 1.2).flatten(), torch.tensor([0.4, 0.7, 1.0]))
    torch.testing.assert_close(A.adjust_contrast(x, 1.2).flatten(), torch.tensor([0.24, 0.6, 1.0]))
    # saturation: HSV of (0.2, 0.5, 0.9) -> S = 0.7/0.9; S*0.5 keeps V and H.
    out = A.adjust_saturation(x, 0.5)
    hsv = kornia.color.rgb_to_hsv(out)
    hsv0 = kornia.color.rgb_to_hsv(x)
    torch.testing.assert_close(hsv[:, 1], hsv0[:, 1] * 0.5, atol=1e-5, rtol=0)
    torch.testing.assert_close(hsv[:, 2], hsv0[:, 2])
    torch.testing.assert_close(hsv[:, 0], hsv0[:, 0], atol=1e-5, rtol=0)
    # hue: a shift by 1/3 turn maps R->G->B cyclically for a pure colour
    red = torch.tensor([0.8, 0.1, 0.1]).view(1, 3, 1, 1)
    for turn, expected in ((1 / 3, [0.1, 0.8, 0.1]), (-1 / 3, [0.1, 0.1, 0.8])):
        got = A.adjust_hue(red, turn).flatten()
        torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=0)


def test_per_sample_factors():
    x = torch.full((2, 3, 1, 1), 0.5)
    out = A.adjust_brightness(x, torch.tensor([0.9, 1.1]))
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([0.4, 0.6]))


def test_color_jitter_matches_composed_ops_and_is_reproducible():
    x = _images(1)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out1 = A.color_jitter(x, 0.2, g1)
    out2 = A.color_jitter(x, 0.2, g2)
    assert torch.equal(out1, out2)
    # Recompute by hand with the same draws.
    g = torch.Generator().manual_seed(5)
    f = [0.8 + 0.4 * torch.rand(2, generator=g, dtype=torch.float64) for _ in range(3)]
    f.append(-0.2 + 0.4 * torch.rand(2, generator=g, dtype=torch.float64))
    orders = [torch.randperm(4, generator=g).tolist() for _ in range(2)]
    rgb = A.denormalize(x)
    ops = [A.adjust_brightness, A.adjust_contrast, A.adjust_saturation, A.adjust_hue]
    for b in range(2):
        y = rgb[b:b + 1]
        for k in orders[b]:
            y = ops[k](y, f[k][b:b + 1].float())
        torch.testing.assert_close(out1[b:b + 1], A.renormalize(y))
    assert not torch.allclose(out1, x)


def test_kernel_size_rule():
    assert A.blur_kernel_size(512) == 51
    assert A.blur_kernel_size(1024) == 103
    assert A.blur_kernel_size(64) == 7
    for d in range(1, 600):
        k = A.blur_kernel_size(d)
        assert k % 2 == 1 and k >= 1


def test_gaussian_blur_matches_kornia():
    x = _images(2, h=30, w=40)
    sigma = torch.tensor([0.3, 1.1])
    out = A.gaussian_blur(x, sigma)
    for b in range(2):
        k = (A.blur_kernel_size(30), A.blur_kernel_size(40))
        s = float(sigma[b])
        ref = kornia.filters.gaussian_blur2d(x[b:b + 1], k, (s, s), border_type="reflect")
        torch.testing.assert_close(out[b:b + 1], ref, atol=1e-4, rtol=1e-5)
    # blur preserves a constant image
    c = torch.full((1, 3, 30, 40), 0.7)
    torch.testing.assert_close(A.gaussian_blur(c, torch.tensor([0.9])), c)


def test_gates_and_strong_augment_do_not_modify_input():
    x = _images(3)
    x0 = x.clone()
    g = torch.Generator().manual_seed(0)
    gates = A.AugmentGates(color_jitter=0.9, blur=0.9)
    out = A.strong_augment(x, gates, g)
    assert torch.equal(x, x0) and not torch.allclose(out, x)
    off = A.strong_augment(x, A.AugmentGates(color_jitter=0.1, blur=0.1), g)
    assert torch.equal(off, x) and off.data_ptr() != x.data_ptr()
    weak = A.weak_augment(x, gates, g)
    assert torch.equal(x, x0) and weak.data_ptr() != x.data_ptr()


def test_draw_gates():
    g = torch.Generator().manual_seed(0)
    gates = A.draw_gates(g, blur=False)
    assert gates.blur == 0.0 and 0 <= gates.color_jitter < 1
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert A.draw_gates(g1) == A.draw_gates(g2)


def test_blur_only_order_in_weak_vs_strong():
    # jitter then blur vs blur then jitter differ in general (the weak view blurs first).
    x = _images(4)
    gates = A.AugmentGates(color_jitter=0.9, blur=0.9)
    s = A.strong_augment(x, gates, torch.Generator().manual_seed(1))
    w = A.weak_augment(x, gates, torch.Generator().manual_seed(1))
    assert s.shape == w.shape == x.shape


def test_gaussian_kernel1d():
    k = A.gaussian_kernel1d(5, torch.tensor([1.0]))
    x = torch.arange(5.0) - 2
    e = torch.exp(-x ** 2 / 2)
    torch.testing.assert_close(k[0], e / e.sum())
    assert math.isclose(float(A.gaussian_kernel1d(4, torch.tensor([0.5])).sum()), 1.0, rel_tol=1e-6)


def test_cuda_generator_rejected():
    class Fake:
        device = torch.device("meta")

    with pytest.raises(ValueError):
        A.draw_gates(Fake())  # type: ignore[arg-type]

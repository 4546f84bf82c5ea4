"""The strong (and weak) augmentation against spec 4.4 / 6.4: order, gates, ranges, per-image draws.

Spec 4.4 (``strong_transform`` = one_mix -> color_jitter -> gaussian_blur):
- gates ``u_cj`` and ``u_b`` drawn once per iteration; jitter if ``u_cj > p``, blur if ``u_b > 0.5``
  (``u_b`` is 0 when blur is disabled);
- kornia 0.5.8 ``ColorJitter(s, s, s, s)``: brightness/contrast/saturation ~ U[1-s, 1+s], hue ~ U[-s, s],
  the four ops in a ``randperm(4)`` order, all per image;
- blur sigma ~ U(0.15, 1.15) per image, kernel ``floor(ceil(0.1 D) - 0.5 + ceil(0.1 D) mod 2)`` per dim.
Spec 6.4: the intended weak view blurs first, then jitters.

The primitives are replaced by recorders (monkeypatch) where the test is about what is called, in
which order and with which arguments.
"""

from __future__ import annotations

import pytest
import torch

from dida.uda import augment as A

OP_NAMES = ("brightness", "contrast", "saturation", "hue")


def _images(b: int = 2, h: int = 8, w: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return A.renormalize(torch.rand(b, 3, h, w, generator=g))


@pytest.fixture
def calls(monkeypatch) -> list[tuple]:
    """Replace ``color_jitter`` and ``gaussian_blur`` by recorders; returns the call log.

    Each recorder returns a new tensor that differs from its input (+1 / +10), so the composition order
    is visible in the output too.
    """
    log: list[tuple] = []

    def jitter(x, strength, generator, mean=None, std=None):
        log.append(("jitter", strength, x.clone()))
        return x + 1.0

    def blur(x, sigma):
        log.append(("blur", sigma.clone(), x.clone()))
        return x + 10.0

    monkeypatch.setattr(A, "color_jitter", jitter)
    monkeypatch.setattr(A, "gaussian_blur", blur)
    return log


def _names(log: list[tuple]) -> list[str]:
    return [c[0] for c in log]


# ------------------------------------------------------------------------------------------- order


def test_strong_augment_jitters_then_blurs(calls):
    x = _images()
    x0 = x.clone()
    out = A.strong_augment(x, A.AugmentGates(color_jitter=0.9, blur=0.9), torch.Generator().manual_seed(0),
                           color_jitter_strength=0.3)
    assert _names(calls) == ["jitter", "blur"]
    assert calls[0][1] == 0.3  # the strength is passed on
    assert torch.equal(calls[0][2], x0)  # jitter sees the input ...
    assert torch.equal(calls[1][2], x0 + 1.0)  # ... and blur sees the jittered image
    assert torch.equal(out, (x0 + 1.0) + 10.0)
    assert torch.equal(x, x0)


def test_weak_augment_blurs_then_jitters(calls):
    x = _images()
    x0 = x.clone()
    out = A.weak_augment(x, A.AugmentGates(color_jitter=0.9, blur=0.9), torch.Generator().manual_seed(0),
                         color_jitter_strength=0.3)
    assert _names(calls) == ["blur", "jitter"]
    assert torch.equal(calls[0][2], x0) and torch.equal(calls[1][2], x0 + 10.0)
    assert calls[1][1] == 0.3
    assert torch.equal(out, (x0 + 10.0) + 1.0)
    assert torch.equal(x, x0)


# ------------------------------------------------------------------------------------------- gates

P = 0.2  # the reference's color_jitter_probability
NEXT = 1e-9  # just above the threshold


@pytest.mark.parametrize("augment, both", [(A.strong_augment, ["jitter", "blur"]),
                                           (A.weak_augment, ["blur", "jitter"])])
@pytest.mark.parametrize(
    "u_cj, u_b, jitter, blur",
    [
        (P, 0.5, False, False),  # strict '>': equal to the threshold is off
        (P + NEXT, 0.5, True, False),
        (P, 0.5 + NEXT, False, True),
        (P + NEXT, 0.5 + NEXT, True, True),
        (0.0, 0.0, False, False),
        (0.999, 0.999, True, True),
    ],
)
def test_gates_are_strict_thresholds(calls, augment, both, u_cj, u_b, jitter, blur):
    x = _images()
    out = augment(x, A.AugmentGates(color_jitter=u_cj, blur=u_b), torch.Generator().manual_seed(0),
                  color_jitter_prob=P)
    expected = [n for n in both if (n == "jitter" and jitter) or (n == "blur" and blur)]
    assert _names(calls) == expected
    if not expected:  # nothing to do: still a new tensor equal to the input
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("prob", [0.0, 0.6, 1.0])
def test_jitter_gate_follows_color_jitter_prob(calls, prob):
    x = _images()
    for u_cj, on in ((prob, False), (min(prob + 0.01, 0.999), prob < 0.999)):
        calls.clear()
        A.strong_augment(x, A.AugmentGates(color_jitter=u_cj, blur=0.0), torch.Generator().manual_seed(0),
                         color_jitter_prob=prob)
        assert _names(calls) == (["jitter"] if on else [])


def test_gates_are_uniform_draws_and_blur_off_never_blurs(calls):
    x = _images(b=1, h=4, w=4)
    n = 400
    blurred_on = blurred_off = jittered = 0
    for seed in range(n):
        on = A.draw_gates(torch.Generator().manual_seed(seed), blur=True)
        off = A.draw_gates(torch.Generator().manual_seed(seed), blur=False)
        assert 0.0 <= on.color_jitter < 1.0 and 0.0 <= on.blur < 1.0
        assert off.blur == 0.0 and off.color_jitter == on.color_jitter
        for gates in (on, off):
            calls.clear()
            A.strong_augment(x, gates, torch.Generator().manual_seed(seed))
            blurred = "blur" in _names(calls)
            if gates is on:
                blurred_on += blurred
                jittered += "jitter" in _names(calls)
            else:
                blurred_off += blurred
    assert blurred_off == 0
    # prob 0.5 for blur and 1 - 0.2 = 0.8 for jitter (binomial, n = 400: 5 sigma ~ 0.125 / 0.1)
    assert abs(blurred_on / n - 0.5) < 0.125
    assert abs(jittered / n - 0.8) < 0.1


# ------------------------------------------------------------------------------ jitter factor ranges


@pytest.fixture
def factors(monkeypatch) -> dict[str, list]:
    """Record the factor and the image index of every colour-jitter op call (ops still applied)."""
    log: dict[str, list] = {name: [] for name in OP_NAMES}
    log["order"] = []

    def recorder(name, op):
        def wrapped(y, factor):
            assert y.shape[0] == 1 and factor.numel() == 1  # one image at a time, its own factor
            log[name].append(float(factor))
            log["order"].append(name)
            return op(y, factor)

        return wrapped

    # color_jitter applies the four ops from this table (brightness, contrast, saturation, hue).
    monkeypatch.setattr(A, "_OPS", tuple(recorder(n, op) for n, op in zip(OP_NAMES, A._OPS)))
    return log


def _jitter_many(strength: float, n: int = 300, seed: int = 0) -> None:
    x = _images(b=n, h=1, w=1, seed=seed)
    A.color_jitter(x, strength, torch.Generator().manual_seed(seed))


def _assert_uniform_range(values: list[float], low: float, high: float, slack: float) -> None:
    assert low - 1e-6 <= min(values) and max(values) <= high + 1e-6, (min(values), max(values))
    # the draws fill the range (U[low, high] with n = 300: the extremes are within 2% of its ends)
    assert min(values) < low + slack and max(values) > high - slack, (min(values), max(values))


@pytest.mark.parametrize("strength", [0.2, 0.4])
def test_jitter_factor_ranges_follow_kornia_0_5_8(factors, strength):
    _jitter_many(strength)
    slack = 0.05 * 2 * strength
    for name in ("brightness", "contrast", "saturation"):
        assert len(factors[name]) == 300
        _assert_uniform_range(factors[name], 1 - strength, 1 + strength, slack)
    _assert_uniform_range(factors["hue"], -strength, strength, slack)


def test_reference_strength_gives_the_spec_ranges(factors):
    # 4.4: "brightness b ~ U[0.8,1.2] ... contrast c ~ U[0.8,1.2] ... saturation s ~ U[0.8,1.2] ...
    # hue h ~ U[-0.2,0.2]" for ColorJitter(0.2, 0.2, 0.2, 0.2).
    _jitter_many(0.2)
    for name in ("brightness", "contrast", "saturation"):
        _assert_uniform_range(factors[name], 0.8, 1.2, 0.02)
    _assert_uniform_range(factors["hue"], -0.2, 0.2, 0.02)


def test_large_strength_is_clipped_like_kornia_0_5_8(factors):
    # kornia 0.5.8 _range_bound: contrast/saturation [max(0, 1-s), 1+s]; hue within (-0.5, 0.5).
    _jitter_many(0.7)
    for name in ("contrast", "saturation"):
        _assert_uniform_range(factors[name], 0.3, 1.7, 0.07)
    _assert_uniform_range(factors["hue"], -0.5, 0.5, 0.05)
    factors["contrast"].clear()
    _jitter_many(1.5)
    assert min(factors["contrast"]) >= 0.0 and max(factors["contrast"]) > 2.3


def test_brightness_range_is_bounded_by_two_like_kornia_0_5_8(factors):
    _jitter_many(1.5)
    _assert_uniform_range(factors["brightness"], 0.0, 2.0, 0.1)


def test_jitter_factors_and_op_order_are_per_image(factors):
    n = 64
    _jitter_many(0.2, n=n)
    for name in OP_NAMES:
        assert len(factors[name]) == n and len(set(factors[name])) == n  # one draw per image
    orders = [tuple(factors["order"][4 * i: 4 * i + 4]) for i in range(n)]
    assert all(sorted(o) == sorted(OP_NAMES) for o in orders)  # each op exactly once per image
    assert len(set(orders)) > 6  # a random permutation per image (24 possible)


def test_jitter_is_reproducible_and_does_not_modify_the_input():
    x = _images(b=3)
    x0 = x.clone()
    a = A.color_jitter(x, 0.2, torch.Generator().manual_seed(7))
    b = A.color_jitter(x, 0.2, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(x, x0) and not torch.allclose(a, x)


# ----------------------------------------------------------------------------------------- blur


def test_blur_sigma_range_and_per_image_draws(calls):
    n = 400
    x = _images(b=n, h=2, w=2)
    A.strong_augment(x, A.AugmentGates(color_jitter=0.0, blur=0.9), torch.Generator().manual_seed(0))
    assert _names(calls) == ["blur"]
    sigma = calls[0][1]
    assert sigma.shape == (n,)  # one sigma per image (shared by both axes, see below)
    assert len(set(sigma.tolist())) == n
    # 4.4: sigma ~ np.random.uniform(0.15, 1.15)
    assert sigma.min() >= 0.15 and sigma.max() < 1.15
    assert sigma.min() < 0.15 + 0.02 and sigma.max() > 1.15 - 0.02


def _impulse_support(h: int, w: int, sigma: float) -> tuple[int, int]:
    """Rows and columns reached by the blur of a centred impulse."""
    x = torch.zeros(1, 1, h, w, dtype=torch.float64)
    x[0, 0, h // 2, w // 2] = 1.0
    out = A.gaussian_blur(x, torch.tensor([sigma]))
    nz = out[0, 0] != 0
    return int(nz.any(dim=1).sum()), int(nz.any(dim=0).sum())


def test_blur_kernel_size_per_dimension():
    # 4.4: "Kernel size per dim = floor(ceil(0.1 D) - 0.5 + ceil(0.1 D) mod 2) -> 51x51 for D = 512";
    # 103 for D = 1024. A huge sigma makes every kernel tap non-zero, so the support is the kernel size.
    assert _impulse_support(512, 3, 1e4) == (51, 1)
    assert _impulse_support(3, 1024, 1e4) == (1, 103)
    assert _impulse_support(64, 128, 1e4) == (7, 13)


def test_blur_uses_one_sigma_for_both_axes():
    x = torch.zeros(1, 1, 41, 41, dtype=torch.float64)
    x[0, 0, 20, 20] = 1.0
    out = A.gaussian_blur(x, torch.tensor([1.1]))[0, 0]
    torch.testing.assert_close(out, out.T)
    # ... the outer product of two normalised 1-D kernels exp(-d^2 / 2 sigma^2), 5 taps for D = 41
    d = torch.arange(5, dtype=torch.float64) - 2
    k = torch.exp(-d ** 2 / (2 * 1.1 ** 2))
    k = k / k.sum()
    torch.testing.assert_close(out[18:23, 18:23], torch.outer(k, k), rtol=1e-5, atol=1e-6)
    assert float(out.sum()) == pytest.approx(1.0) and int((out != 0).sum()) == 25


def test_blur_does_not_modify_the_input():
    x = _images(b=2, h=12, w=14)
    x0 = x.clone()
    out = A.strong_augment(x, A.AugmentGates(color_jitter=0.9, blur=0.9), torch.Generator().manual_seed(3))
    assert torch.equal(x, x0) and out.data_ptr() != x.data_ptr() and not torch.allclose(out, x)
    out = A.weak_augment(x, A.AugmentGates(color_jitter=0.9, blur=0.9), torch.Generator().manual_seed(3))
    assert torch.equal(x, x0) and out.data_ptr() != x.data_ptr() and not torch.allclose(out, x)

"""Cross-level interaction and instance loss (spec 6.5-6.7): direct values and the chunked equivalent."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dida.uda import dual_level
from dida.uda.dual_level import (
    calibrate,
    instance_loss,
    instance_term,
    normalize_similarity,
    scatter_semantic,
    semantic_term,
)
from dida.uda.instance_bank import InstanceBank
from dida.uda.interpolation import (
    RowChunkUpsampler,
    bilinear_matrices,
    dense_resize_adjoint,
    downsample_adjoint,
    resize_adjoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("size_in, size_out", [((8, 8), (32, 32)), ((7, 5), (19, 23)), ((6, 9), (6, 9)), ((5, 4), (3, 2))])
def test_interpolation_matrices_match_f_interpolate(size_in, size_out):
    x = torch.randn(2, 3, *size_in, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(x, size=size_out, mode="bilinear", align_corners=False)
    a_h, a_w = bilinear_matrices(size_in, size_out)
    assert a_h.shape == (size_out[0], size_in[0]) and a_w.shape == (size_out[1], size_in[1])
    assert_close(a_h.sum(1), torch.ones(size_out[0]))
    assert_close(a_h @ x @ a_w.T, ref, rtol=0, atol=2e-6)
    ups = RowChunkUpsampler(size_in, size_out, x.device)
    for r0, r1 in [(0, size_out[0]), (1, min(3, size_out[0])), (size_out[0] - 1, size_out[0])]:
        assert_close(ups.up(x, r0, r1), ref[:, :, r0:r1], rtol=0, atol=2e-6)


def test_adjoint_is_the_transpose():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 5, 7, generator=g), torch.randn(2, 3, 13, 11, generator=g)
    ups = RowChunkUpsampler((5, 7), (13, 11), x.device)
    grad = torch.zeros_like(x)
    for r0 in range(0, 13, 4):
        ups.adjoint(y[:, :, r0 : r0 + 4], r0, grad)
    up = F.interpolate(x, size=(13, 11), mode="bilinear", align_corners=False)
    assert_close((up * y).sum(), (x * grad).sum())
    assert_close(resize_adjoint(y, (5, 7)), grad)
    assert_close(dense_resize_adjoint(y, (5, 7)), grad)  # the deterministic CUDA fallback
    m = torch.rand(3, 20, 18, generator=g)
    e = torch.rand(3, 5, 6, generator=g)
    up = F.interpolate(e[None], size=(20, 18), mode="bilinear", align_corners=False)[0]
    assert_close((up * m).sum(), (e * downsample_adjoint(m, (5, 6))).sum())


def test_calibrate_hand_checked():
    s = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    z = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)  # class logits
    labels = torch.tensor([0, 1, 0])
    q = calibrate(s, z, labels)
    # s*g = [2, -2, 6] -> sum 6 -> [1/3, -1/3, 1]: negative entries and 1 are possible (spec 6.6)
    assert_close(q.flatten(), torch.tensor([1 / 3, -1 / 3, 1.0]))
    assert not q.requires_grad


def test_normalisation_and_instance_loss_hand_checked():
    s = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1).repeat(1, 1, 1, 2)
    assert_close(normalize_similarity(s)[0, :, 0, 0], torch.tensor([0.25, 0.75]))
    target = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1).repeat(1, 1, 1, 2)
    student = s.clone().requires_grad_(True)
    loss = instance_loss(target, student, weight=0.5)
    expected = 0.5 * -(0.5 * math.log(0.25 + 1e-10) + 0.5 * math.log(0.75 + 1e-10))
    assert_close(loss, torch.tensor(expected))
    loss.backward()
    assert student.grad is not None and target.grad is None


def test_scatter_semantic():
    probs = torch.tensor([0.7, 0.3]).view(1, 2, 1, 1)
    s = torch.tensor([1.0, 1.0, 2.0]).view(1, 3, 1, 1)
    labels = torch.tensor([1, 0, 1])
    assert scatter_semantic(probs, s, labels, 1.0) is probs
    out = scatter_semantic(probs, s, labels, 0.5)
    # s~ = [0.25, 0.25, 0.5]; agg = [0.7 + 0.25, 0.3 + 0.75]; 0.5*probs + 0.5*agg = probs + 0.5*sum
    assert_close(out.flatten(), torch.tensor([0.7 + 0.125, 0.3 + 0.375]))


def test_semantic_term_chunked_equals_direct():
    g = torch.Generator().manual_seed(2)
    bank = InstanceBank.random(12, 8, 5, generator=g)
    e_w = torch.rand(2, 8, 8, 8, generator=g)
    probs = torch.softmax(torch.randn(2, 5, 32, 32, generator=g), 1)
    direct = semantic_term(bank, probs, e_w, 0.7, chunk_rows=0)
    up = F.interpolate(e_w, size=(32, 32), mode="bilinear", align_corners=False)
    assert_close(direct, scatter_semantic(probs, bank.similarity(up), bank.labels, 0.7))
    assert_close(semantic_term(bank, probs, e_w, 0.7, chunk_rows=5), direct, rtol=1e-5, atol=1e-6)
    assert semantic_term(bank, probs, e_w, 1.0) is probs


def _inputs(seed=0, b=2, d=8, k=12, c=5, h=8, w=8, logit=None):
    """Bank, embeddings ``[B, D, h, w]`` and logits ``[B, C, *logit]`` (default: the embeddings' grid; HRDA's
    fused logits are on a finer one)."""
    g = torch.Generator().manual_seed(seed)
    bank = InstanceBank(torch.rand(k, d, generator=g), torch.arange(k) % c)
    e_w = torch.rand(b, d, h, w, generator=g)  # post-ReLU: non-negative
    e_s = torch.rand(b, d, h, w, generator=g).requires_grad_(True)
    # logits kept positive so the calibration denominator stays away from 0 (else q is ill-conditioned)
    z = torch.rand(b, c, *(logit or (h, w)), generator=g) * 2 + 1
    return bank, e_w, e_s, z


def _reference(bank, e_w, e_s, z, out_size, weight, cal):
    """The reference way, written independently: upsample everything, then the formulas of spec 6.6/6.7."""
    up = lambda x: F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
    s = torch.einsum("bdhw,kd->bkhw", up(e_w), bank.features)
    if cal:
        g = up(z).gather(1, bank.labels.view(1, -1, 1, 1).expand(z.shape[0], -1, *out_size))
        q = s * g / (s * g).sum(1, keepdim=True)
    else:
        q = s / s.sum(1, keepdim=True)
    p_raw = torch.einsum("bdhw,kd->bkhw", up(e_s), bank.features)
    p = p_raw / p_raw.sum(1, keepdim=True)
    return weight * (-(q * torch.log(p + 1e-10)).sum(1)).mean()


@pytest.mark.parametrize("cal", [True, False])
@pytest.mark.parametrize("chunk_rows", [0, 1, 5, 64])
def test_instance_term_value_and_gradient_match_reference(cal, chunk_rows):
    bank, e_w, e_s, z = _inputs()
    out_size = (32, 32)
    ref = _reference(bank, e_w, e_s, z, out_size, 0.5, cal)
    (g_ref,) = torch.autograd.grad(ref, e_s)
    loss = instance_term(bank, e_w, e_s, z, out_size, weight=0.5, calibrate=cal, chunk_rows=chunk_rows)
    (g,) = torch.autograd.grad(loss, e_s)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert_close(g, g_ref, rtol=1e-4, atol=1e-9)


def test_instance_term_non_integer_ratio_and_backward_through_graph():
    bank, e_w, e_s, z = _inputs(seed=1, h=7, w=9)
    leaf = e_s.detach().clone().requires_grad_(True)
    out_size = (19, 30)
    ref = _reference(bank, e_w, leaf * 2, z, out_size, 0.3, True)
    (g_ref,) = torch.autograd.grad(ref, leaf)
    # gradient must flow through upstream ops via .backward()
    loss = instance_term(bank, e_w, leaf * 2, z, out_size, weight=0.3, chunk_rows=4)
    loss.backward()
    assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert_close(leaf.grad, g_ref, rtol=1e-4, atol=1e-9)


def test_instance_term_only_student_embedding_gets_gradient():
    bank, e_w, e_s, z = _inputs()
    e_w.requires_grad_(True)
    z.requires_grad_(True)
    instance_term(bank, e_w, e_s, z, (16, 16), chunk_rows=4).backward()
    assert e_s.grad is not None and e_w.grad is None and z.grad is None
    assert bank.features.grad is None


def test_instance_term_without_grad_and_bad_inputs():
    bank, e_w, e_s, z = _inputs()
    with torch.no_grad():
        a = instance_term(bank, e_w, e_s, z, (16, 16), chunk_rows=3)
        b = instance_term(bank, e_w, e_s, z, (16, 16), chunk_rows=0)
    assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one resolution"):
        instance_term(bank, e_w[..., :4], e_s, z, (16, 16))
    with pytest.raises(ValueError, match="chunk_rows"):
        instance_term(bank, e_w, e_s, z, (16, 16), chunk_rows=-1)


def test_instance_term_zero_embedding_gives_nan_like_the_reference():
    bank, e_w, e_s, z = _inputs()
    e_s = torch.zeros_like(e_s)
    assert torch.isnan(instance_term(bank, e_w, e_s, z, (16, 16), chunk_rows=4))
    assert torch.isnan(instance_term(bank, e_w, e_s, z, (16, 16), chunk_rows=0))


@pytest.mark.gpu
@pytest.mark.parametrize("cal", [True, False])
def test_instance_term_on_cuda_matches_cpu_reference(cal):
    bank, e_w, e_s, z = _inputs(seed=5, k=40, d=16, h=16, w=16)
    ref = _reference(bank, e_w, e_s, z, (64, 64), 0.5, cal)
    (g_ref,) = torch.autograd.grad(ref, e_s)
    dev = torch.device("cuda")
    e_s_cuda = e_s.detach().to(dev).requires_grad_(True)
    for chunk_rows in (0, 7):
        loss = instance_term(bank.to(dev), e_w.to(dev), e_s_cuda, z.to(dev), (64, 64), calibrate=cal,
                             chunk_rows=chunk_rows)  # fmt: skip
        (g,) = torch.autograd.grad(loss, e_s_cuda)
        assert_close(loss.cpu(), ref, rtol=1e-5, atol=1e-6)
        assert_close(g.cpu(), g_ref, rtol=1e-4, atol=1e-9)


@pytest.mark.gpu
def test_instance_term_on_cuda_in_deterministic_mode(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    bank, e_w, e_s, z = _inputs(seed=6, k=40, d=16, h=16, w=16)
    ref = _reference(bank, e_w, e_s, z, (64, 64), 0.5, True)
    (g_ref,) = torch.autograd.grad(ref, e_s)
    dev = torch.device("cuda")
    e_s_cuda = e_s.detach().to(dev).requires_grad_(True)
    torch.use_deterministic_algorithms(True)
    try:
        loss = instance_term(bank.to(dev), e_w.to(dev), e_s_cuda, z.to(dev), (64, 64), chunk_rows=7)
        (g,) = torch.autograd.grad(loss, e_s_cuda)
    finally:
        torch.use_deterministic_algorithms(False)
    assert_close(loss.cpu(), ref, rtol=1e-5, atol=1e-6)
    assert_close(g.cpu(), g_ref, rtol=1e-4, atol=1e-9)


# ------------------------------------------- logits on their own grid (HRDA: fused logits at H/4, embedding at H/8)


@pytest.mark.parametrize("cal", [True, False])
@pytest.mark.parametrize("chunk_rows", [0, 1, 5, 64])
@pytest.mark.parametrize("grids", [((8, 8), (16, 16), (32, 32)), ((7, 9), (13, 17), (28, 36))])
def test_instance_term_with_logits_on_their_own_grid(cal, chunk_rows, grids):
    emb, logit, out_size = grids
    bank, e_w, e_s, z = _inputs(h=emb[0], w=emb[1], logit=logit)
    ref = _reference(bank, e_w, e_s, z, out_size, 0.5, cal)
    (g_ref,) = torch.autograd.grad(ref, e_s)
    loss = instance_term(bank, e_w, e_s, z, out_size, weight=0.5, calibrate=cal, chunk_rows=chunk_rows)
    (g,) = torch.autograd.grad(loss, e_s)
    assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert_close(g, g_ref, rtol=1e-4, atol=1e-9)


def test_chunked_and_direct_agree_and_the_chunked_one_never_builds_a_full_map(monkeypatch):
    bank, e_w, e_s, z = _inputs(k=20, h=16, w=16, logit=(32, 32))
    out_size = (128, 128)  # HRDA: embedding at 1/8, logits at 1/4 of the crop
    direct = instance_term(bank, e_w, e_s, z, out_size, chunk_rows=0)
    (g_direct,) = torch.autograd.grad(direct, e_s)
    heights: list[int] = []
    original = RowChunkUpsampler.up

    def spy(self, x, r0, r1):
        out = original(self, x, r0, r1)
        heights.append(out.shape[-2])
        return out

    monkeypatch.setattr(RowChunkUpsampler, "up", spy)
    monkeypatch.setattr(dual_level, "resize", lambda *a, **k: pytest.fail("full-resolution resize"))
    chunked = instance_term(bank, e_w, e_s, z, out_size, chunk_rows=16)
    (g_chunked,) = torch.autograd.grad(chunked, e_s)
    assert_close(chunked, direct, rtol=1e-5, atol=1e-6)
    assert_close(g_chunked, g_direct, rtol=1e-4, atol=1e-9)
    assert heights and max(heights) <= 16  # every upsampled map is one chunk of rows, never [B, K, H, W]


def test_embeddings_must_share_a_grid():
    bank, e_w, e_s, z = _inputs(logit=(16, 16))
    with pytest.raises(ValueError, match="one resolution"):
        instance_term(bank, e_w[..., :4], e_s, z, (32, 32))

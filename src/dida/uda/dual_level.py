"""DIDA's cross-level interaction and instance loss (spec 6.5-6.7), direct and memory-bounded.

Reference computation (everything at the crop size ``H x W``, after upsampling the 1/4-resolution maps
bilinearly with ``align_corners=False``)::

    s_k(x) = <e_w(x), B_k>                          teacher similarity, raw dot product, no grad
    g_k(x) = z_{l_k}(x)                             student logits gathered at the entry's class
    q_k(x) = s_k g_k / sum_j s_j g_j                calibrated target ("gather"), no grad
    p_k(x) = <e_s(x), B_k> / sum_j <e_s(x), B_j>    student distribution over the bank
    L_in   = weight * mean_{b,x} [ -sum_k q_k log(p_k + 1e-10) ]

The direct functions (``calibrate``, ``instance_loss``, ``scatter_semantic``) take full-resolution
tensors and reproduce the reference line by line. ``instance_term`` takes the low-resolution network
outputs and computes the same loss without ever building a ``[B, K, H, W]`` tensor: similarities and
gathered logits are linear in the embedding/logits, so they are computed at low resolution and
upsampled (the upsampling commutes with them up to float rounding). The non-linear part runs over
chunks of output rows, each chunk upsampled on the fly with the separable bilinear weights, and its
gradient is computed in closed form inside the same loop, so peak memory grows with
``B * K * chunk_rows * W`` instead of ``B * K * H * W``.

The embeddings (teacher and student, one grid) and the calibration logits may live on different grids:
each is upsampled to the crop size by its own row-chunk upsampler. HRDA is the case: its embedding is the
context branch's (``H/8``), its logits the fused ones (``H/4``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dida.models.ops import resize
from dida.uda.interpolation import RowChunkUpsampler, row_chunk_upsampler

if TYPE_CHECKING:
    from dida.uda.instance_bank import InstanceBank

LOG_EPS = 1e-10  # the reference's log(p + 1e-10)
# On CPU a chunk of ``instance_term`` is capped at about this many bytes per [B, K, rows, W] map, so
# that the ~20 passes over it run in cache instead of main memory (about 2x faster than 64 rows at
# 256x256, B=2, K=300; docs/performance.md). GPUs keep ``chunk_rows`` (fewer, larger kernels).
CPU_CHUNK_BYTES = 4 * 2**20


# ---------------------------------------------------------------------------- direct (full resolution)


def gather_by_label(logits: Tensor, bank_labels: Tensor) -> Tensor:
    """``g[:, k] = logits[:, l_k]``: ``[B, C, H, W], [K] -> [B, K, H, W]``."""
    return logits.index_select(1, bank_labels.to(device=logits.device, dtype=torch.long))


def calibrate(teacher_similarity: Tensor, student_logits: Tensor, bank_labels: Tensor) -> Tensor:
    """The "gather" target ``q_k = s_k g_k / sum_j s_j g_j`` (spec 6.6), computed without grad.

    Args:
        teacher_similarity: raw teacher similarities ``s`` ``[B, K, H, W]``.
        student_logits: raw student logits ``z`` ``[B, C, H, W]`` (same spatial size).
        bank_labels: int64 ``[K]`` class of each bank entry.

    Returns:
        ``q`` ``[B, K, H, W]``. No epsilon (reference): a zero denominator gives inf/NaN, and since
        logits can be negative, ``q`` may hold negative values or values above 1.
    """
    with torch.no_grad():
        t = teacher_similarity * gather_by_label(student_logits, bank_labels)
        return t / t.sum(dim=1, keepdim=True)


_calibrate = calibrate  # ``instance_term`` has a ``calibrate`` flag that shadows the function


def normalize_similarity(similarity: Tensor) -> Tensor:
    """Sum-normalisation over the bank axis: ``s / sum_k s`` (``[B, K, H, W]``), no epsilon."""
    return similarity / similarity.sum(dim=1, keepdim=True)


def instance_loss(target: Tensor, student_similarity: Tensor, weight: float = 0.5) -> Tensor:
    """``weight * mean_{b,x} [-sum_k target_k log(p_k + 1e-10)]`` with ``p = s / sum_k s`` (spec 6.7).

    Args:
        target: ``[B, K, H, W]`` (detached here).
        student_similarity: raw student similarities ``[B, K, H, W]`` (with grad).
        weight: the reference's ``ins_lambda`` (0.5).

    Returns:
        A scalar. The mean runs over every pixel (no ignore mask, no confidence weighting).
    """
    p = normalize_similarity(student_similarity)
    per_pixel = -(target.detach() * torch.log(p + LOG_EPS)).sum(dim=1)
    return weight * per_pixel.mean()


def scatter_semantic(
    teacher_probs: Tensor, teacher_similarity: Tensor, bank_labels: Tensor, a_smooth: float
) -> Tensor:
    """The "scatter" refinement of the semantic target (spec 6.6; inactive with the default 1.0).

    ``agg_c = probs_c + sum_{k: l_k = c} s~_k`` with ``s~`` the sum-normalised teacher similarity, then
    ``a * probs + (1 - a) * agg`` (not a convex combination, as in the reference).

    Args:
        teacher_probs: teacher softmax ``[B, C, H, W]``.
        teacher_similarity: raw teacher similarities ``[B, K, H, W]``.
        bank_labels: int64 ``[K]``.
        a_smooth: mixing factor; ``1.0`` returns ``teacher_probs`` itself, untouched.

    Returns:
        ``[B, C, H, W]``, computed without grad.
    """
    if a_smooth == 1:
        return teacher_probs
    with torch.no_grad():
        s = normalize_similarity(teacher_similarity).to(teacher_probs.dtype)
        index = bank_labels.to(device=s.device, dtype=torch.long).view(1, -1, 1, 1).expand_as(s)
        agg = teacher_probs.scatter_add(1, index, s)
        return a_smooth * teacher_probs + (1.0 - a_smooth) * agg


# ---------------------------------------------------------------------------- memory-bounded term


class _ChunkedInstanceLoss(torch.autograd.Function):
    """Instance loss from low-resolution K-channel maps, upsampled chunk by chunk of output rows.

    The gradient w.r.t. the student's low-resolution similarities is computed in closed form during
    the forward loop (``dL/dP_m = -(a_m - sum_k a_k p_k) / S`` with ``a = q / (p + eps)``,
    ``S = sum_k P_k``) and pulled back through the transposed upsampling, so no chunk is kept and
    nothing is recomputed.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        p_low: Tensor,
        s_low: Tensor,
        logits: Tensor | None,
        bank_labels: Tensor,
        ups: RowChunkUpsampler,
        logit_ups: RowChunkUpsampler | None,
        chunk_rows: int,
        scale: float,
    ) -> Tensor:
        need_grad = ctx.needs_input_grad[0]
        grad_low = torch.zeros_like(p_low) if need_grad else None
        total = torch.zeros((), dtype=torch.float64, device=p_low.device)
        for r0 in range(0, ups.out_size[0], chunk_rows):
            r1 = min(ups.out_size[0], r0 + chunk_rows)
            q = ups.up(s_low, r0, r1)  # [B, K, R, W]
            if logits is not None:
                assert logit_ups is not None
                # gather after upsampling (a channel selection commutes with it): C channels upsampled, not K
                q.mul_(gather_by_label(logit_ups.up(logits, r0, r1), bank_labels))
            q.div_(q.sum(dim=1, keepdim=True))
            p = ups.up(p_low, r0, r1)
            denom = p.sum(dim=1, keepdim=True)
            p.div_(denom)
            pe = p + LOG_EPS
            lp = pe.log()
            # per pixel in float32 (K terms), over pixels in float64 (no float64 copy of the chunk)
            total -= lp.mul_(q).sum(dim=1).sum(dtype=torch.float64)
            del lp
            if need_grad:
                a = q.div_(pe)  # reuses q's storage
                del pe
                a.sub_((a * p).sum(dim=1, keepdim=True)).div_(denom).mul_(-scale)
                ups.adjoint(a, r0, grad_low)
            del q, p
        ctx.save_for_backward(grad_low if need_grad else None)
        return (total * scale).to(p_low.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grad_low,) = ctx.saved_tensors
        grad_p = None if grad_low is None else grad_low * grad_out
        return grad_p, None, None, None, None, None, None, None


def instance_term(
    bank: InstanceBank,
    teacher_embedding: Tensor,
    student_embedding: Tensor,
    student_logits: Tensor,
    out_size: tuple[int, int],
    weight: float = 0.5,
    calibrate: bool = True,
    chunk_rows: int = 64,
) -> Tensor:
    """DIDA's instance loss ``L_in`` from low-resolution network outputs (spec 6.5-6.7).

    Equals the reference computation at ``out_size`` (all maps upsampled bilinearly with
    ``align_corners=False`` first) up to float rounding.

    Args:
        bank: the instance bank (features ``[K, D]``, labels ``[K]``).
        teacher_embedding: teacher embedding on the target ``[B, D, h, w]`` (no grad is taken).
        student_embedding: student embedding on the mixed image ``[B, D, h, w]`` (with grad), on the
            teacher embedding's grid.
        student_logits: student logits on the mixed image ``[B, C, h', w']`` on any grid (HRDA: the fused
            logits at ``H/4`` while the embeddings are at ``H/8``); detached: the reference computes the
            target under ``no_grad``.
        out_size: ``(H, W)`` the reference upsamples to (the crop size).
        weight: ``ins_lambda`` (0.5).
        calibrate: ``True`` (reference) uses the gather target ``q``; ``False`` uses the sum-normalised
            teacher similarity.
        chunk_rows: output rows per chunk (on CPU capped so that a ``[B, K, rows, W]`` map holds at
            most ``CPU_CHUNK_BYTES``, see ``cpu_chunk_rows``); ``0`` materialises everything at full
            resolution (the reference way, memory ``O(B K H W)``).

    Returns:
        The scalar loss (float32), differentiable w.r.t. ``student_embedding`` only.

    Notes:
        Similarities are computed in float32 with autocast disabled (values reach the hundreds; bf16
        would lose the small differences that the normalisation depends on).
    """
    out_size = (int(out_size[0]), int(out_size[1]))
    if chunk_rows < 0:
        raise ValueError(f"chunk_rows must be >= 0, got {chunk_rows}")
    device_type = student_embedding.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        e_s = student_embedding.float()
        with torch.no_grad():
            e_w = teacher_embedding.detach().float()
            z = student_logits.detach().float()
        if chunk_rows == 0:
            with torch.no_grad():
                s = bank.similarity(resize(e_w, out_size))
                if calibrate:
                    target = _calibrate(s, resize(z, out_size), bank.labels)
                else:
                    target = normalize_similarity(s)
                del s
            return instance_loss(target, bank.similarity(resize(e_s, out_size)), weight)

        h, w = e_s.shape[-2:]
        if tuple(e_w.shape[-2:]) != (h, w):
            raise ValueError(
                "instance_term: the teacher and the student embeddings are paired pixel for pixel and must "
                f"share one resolution, got {tuple(e_w.shape[-2:])} and {(h, w)}"
            )
        with torch.no_grad():
            s_low = bank.similarity(e_w)
        p_low = bank.similarity(e_s)
        ups = row_chunk_upsampler((h, w), out_size, e_s.device)
        logit_ups = row_chunk_upsampler(tuple(z.shape[-2:]), out_size, e_s.device) if calibrate else None
        scale = float(weight) / float(e_s.shape[0] * out_size[0] * out_size[1])
        rows = cpu_chunk_rows(chunk_rows, p_low.shape[0] * p_low.shape[1] * out_size[1] * 4, e_s.device)
        return _ChunkedInstanceLoss.apply(p_low, s_low, z if calibrate else None, bank.labels, ups, logit_ups,
                                          rows, scale)


def cpu_chunk_rows(chunk_rows: int, bytes_per_row: int, device: torch.device) -> int:
    """``chunk_rows``, capped on CPU so that one chunk map holds at most ``CPU_CHUNK_BYTES`` (>= 1 row)."""
    if device.type != "cpu":
        return int(chunk_rows)
    return max(1, min(int(chunk_rows), CPU_CHUNK_BYTES // max(1, int(bytes_per_row))))


def semantic_term(
    bank: InstanceBank,
    teacher_probs: Tensor,
    teacher_embedding: Tensor,
    a_smooth: float,
    chunk_rows: int = 64,
) -> Tensor:
    """``scatter_semantic`` with the teacher similarity computed from a low-resolution embedding.

    Args:
        bank: the instance bank.
        teacher_probs: teacher softmax at full resolution ``[B, C, H, W]``.
        teacher_embedding: teacher embedding ``[B, D, h, w]``; upsampled (bilinear,
            ``align_corners=False``) to ``H x W`` as in the reference, chunk by chunk of rows.
        a_smooth: as in ``scatter_semantic`` (1.0 returns ``teacher_probs`` unchanged).
        chunk_rows: rows per chunk; ``0`` materialises the ``[B, K, H, W]`` similarity.

    Returns:
        ``[B, C, H, W]`` refined teacher probabilities (no grad).
    """
    if a_smooth == 1:
        return teacher_probs
    out_size = tuple(teacher_probs.shape[-2:])
    with torch.no_grad(), torch.autocast(device_type=teacher_probs.device.type, enabled=False):
        e_w = teacher_embedding.detach().float()
        if chunk_rows == 0:
            return scatter_semantic(teacher_probs, bank.similarity(resize(e_w, out_size)), bank.labels, a_smooth)
        s_low = bank.similarity(e_w)
        ups = row_chunk_upsampler(tuple(e_w.shape[-2:]), out_size, e_w.device)
        out = torch.empty_like(teacher_probs)
        for r0 in range(0, out_size[0], chunk_rows):
            r1 = min(out_size[0], r0 + chunk_rows)
            s = ups.up(s_low, r0, r1)
            out[:, :, r0:r1] = scatter_semantic(teacher_probs[:, :, r0:r1], s, bank.labels, a_smooth)
        return out

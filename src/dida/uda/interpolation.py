"""Separable bilinear interpolation (``align_corners=False``) as explicit weights: its adjoint, dense
matrices, and upsampling by blocks of output rows. Used by the instance bank's low-resolution class sums
and by DIDA's memory-bounded terms."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Interp1d", "RowChunkUpsampler", "bilinear_matrices", "dense_resize_adjoint", "downsample_adjoint",
    "interp1d", "resize_adjoint", "row_chunk_upsampler",
]



@dataclass(frozen=True)
class Interp1d:
    """1-D bilinear resize weights of ``F.interpolate(mode="bilinear", align_corners=False)``.

    Output index ``o`` reads ``lam0[o] * x[idx0[o]] + lam1[o] * x[idx1[o]]``.

    Attributes:
        in_size, out_size: lengths of the input and output axis.
        idx0, idx1: int64 ``[out_size]`` source indices (on the target device).
        lam0, lam1: float32 ``[out_size]`` weights, ``lam0 + lam1 == 1``.
    """

    in_size: int
    out_size: int
    idx0: Tensor
    idx1: Tensor
    lam0: Tensor
    lam1: Tensor

    def matrix(self) -> Tensor:
        """Dense ``[out_size, in_size]`` float32 interpolation matrix ``A`` (``y = A @ x``)."""
        a = torch.zeros(self.out_size, self.in_size, dtype=torch.float32, device=self.idx0.device)
        rows = torch.arange(self.out_size, device=self.idx0.device)
        a.index_put_((rows, self.idx0), self.lam0, accumulate=True)
        a.index_put_((rows, self.idx1), self.lam1, accumulate=True)
        return a


def interp1d(in_size: int, out_size: int, device: torch.device | str | None = None) -> Interp1d:
    """Weights of one axis of PyTorch's bilinear resize with ``align_corners=False``.

    Follows ATen's ``area_pixel_compute_source_index``: ``src = (dst + 0.5) * in/out - 0.5``,
    clamped at 0; ``i0 = floor(src)``, ``i1 = min(i0 + 1, in - 1)``, ``lam1 = src - i0``. Computed in
    float32 like ATen does for float32 inputs.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"interp1d: sizes must be >= 1, got in={in_size}, out={out_size}")
    scale = float(in_size) / float(out_size)
    dst = torch.arange(out_size, dtype=torch.float32)
    src = ((dst + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = src.to(torch.int64).clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    lam1 = src - i0.to(torch.float32)
    lam0 = 1.0 - lam1
    return Interp1d(in_size, out_size, i0.to(device), i1.to(device), lam0.to(device), lam1.to(device))


def bilinear_matrices(
    in_size: tuple[int, int], out_size: tuple[int, int], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Dense matrices ``A_h [H, h]`` and ``A_w [W, w]`` with ``up(x) = A_h @ x @ A_w.T`` (per channel).

    Cached per (sizes, device): inside the training step they are built and copied to the device once.
    """
    return _bilinear_matrices(tuple(int(v) for v in in_size), tuple(int(v) for v in out_size),
                              str(torch.device(device)) if device is not None else "cpu")


@functools.lru_cache(maxsize=64)
def _bilinear_matrices(in_size: tuple[int, ...], out_size: tuple[int, ...], device: str) -> tuple[Tensor, Tensor]:
    return (
        interp1d(in_size[0], out_size[0], device).matrix(),
        interp1d(in_size[1], out_size[1], device).matrix(),
    )


def resize_adjoint(y: Tensor, size: tuple[int, int]) -> Tensor:
    """Transpose of ``resize``: ``[..., H, W] -> [..., h, w]``, i.e. ``A_h^T y A_w`` per channel.

    For any map ``e`` of spatial ``size``: ``sum(resize(e, (H, W)) * y) == sum(e * resize_adjoint(y, size))``.
    It is the backward of PyTorch's bilinear upsampling, so the weights are bit-identical to it. That
    kernel accumulates with atomics on CUDA and is refused under
    ``torch.use_deterministic_algorithms(True)``; there the dense ``A_h^T y A_w`` is used instead.
    """
    if y.is_cuda and torch.are_deterministic_algorithms_enabled():
        return dense_resize_adjoint(y, size)
    lead = y.shape[:-2]
    y4 = y.reshape(-1, 1, *y.shape[-2:]) if y.ndim != 4 else y
    out = torch.ops.aten.upsample_bilinear2d_backward(
        y4.contiguous(), list(y.shape[-2:]), [y4.shape[0], y4.shape[1], int(size[0]), int(size[1])], False
    )
    return out.reshape(*lead, int(size[0]), int(size[1]))


def dense_resize_adjoint(y: Tensor, size: tuple[int, int]) -> Tensor:
    """``resize_adjoint`` as two matmuls with the dense interpolation matrices (deterministic)."""
    a_h, a_w = bilinear_matrices((int(size[0]), int(size[1])), tuple(y.shape[-2:]), y.device)
    return torch.matmul(torch.matmul(a_h.T.to(y.dtype), y), a_w.to(y.dtype))


def downsample_adjoint(m: Tensor, size: tuple[int, int]) -> Tensor:
    """Pull full-resolution masks back to an embedding's resolution (alias of ``resize_adjoint``).

    Per-class sums of an upsampled embedding ``e`` are ``sum(up(e) * m_c) = sum(e * A_h^T m_c A_w)``,
    so they can be computed at the embedding's resolution, exactly up to float rounding.
    """
    return resize_adjoint(m, size)


@functools.lru_cache(maxsize=64)
def _row_chunk_upsampler(in_size: tuple[int, int], out_size: tuple[int, int], device: str) -> RowChunkUpsampler:
    return RowChunkUpsampler(in_size, out_size, torch.device(device))


def row_chunk_upsampler(in_size: tuple[int, ...], out_size: tuple[int, ...], device: torch.device) -> RowChunkUpsampler:
    """A cached ``RowChunkUpsampler``: its matrix reaches the device once, not on every step."""
    return _row_chunk_upsampler((int(in_size[0]), int(in_size[1])), (int(out_size[0]), int(out_size[1])),
                                str(device))


class RowChunkUpsampler:
    """Bilinear upsampling ``[..., h, w] -> [..., H, W]`` one block of output rows at a time.

    Rows: a small dense matmul with the block of ``A_h`` that the rows touch; columns: PyTorch's own
    bilinear kernel with the row count unchanged (a height scale of exactly 1 is the identity), so the
    result equals ``F.interpolate(x, (H, W), mode="bilinear", align_corners=False)[..., r0:r1, :]``.
    ``adjoint`` is the exact transpose, accumulated into a low-resolution gradient.
    """

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int], device: torch.device) -> None:
        self.in_size = (int(in_size[0]), int(in_size[1]))
        self.out_size = (int(out_size[0]), int(out_size[1]))
        h_it = interp1d(self.in_size[0], self.out_size[0])  # CPU: the spans below are plain ints
        self._lo = h_it.idx0.tolist()
        self._hi = (h_it.idx1 + 1).tolist()
        self.a_h = h_it.matrix().to(device)

    def span(self, r0: int, r1: int) -> tuple[int, int]:
        """Low-resolution rows ``[lo, hi)`` that output rows ``[r0, r1)`` read (indices are monotone)."""
        return self._lo[r0], max(self._hi[r0:r1])

    def up(self, x: Tensor, r0: int, r1: int) -> Tensor:
        """``[B, K, h, w] -> [B, K, r1 - r0, W]``."""
        lo, hi = self.span(r0, r1)
        rows = torch.matmul(self.a_h[r0:r1, lo:hi].to(x.dtype), x[..., lo:hi, :])
        return F.interpolate(rows, size=(r1 - r0, self.out_size[1]), mode="bilinear", align_corners=False)

    def adjoint(self, y: Tensor, r0: int, out: Tensor) -> None:
        """``out[..., h, w] += up_rows^T(y)`` for ``y [B, K, R, W]`` holding output rows ``r0 : r0 + R``."""
        r1 = r0 + y.shape[-2]
        lo, hi = self.span(r0, r1)
        yw = resize_adjoint(y, (y.shape[-2], self.in_size[1]))
        out[..., lo:hi, :] += torch.matmul(self.a_h[r0:r1, lo:hi].T.to(y.dtype), yw)

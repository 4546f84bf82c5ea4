"""The mean teacher of DACS (spec 4.1): an exponential moving average of the student."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMATeacher", "set_teacher_modes"]


def _is_dropout(module: nn.Module) -> bool:
    # nn.Dropout/Dropout2d/... derive from _DropoutNd; DropPath (ours or timm's) is matched by name so
    # that this module does not depend on where DropPath is defined.
    return isinstance(module, nn.modules.dropout._DropoutNd) or type(module).__name__ == "DropPath"


def set_teacher_modes(model: nn.Module, bn_eval: bool = False) -> None:
    """Put ``model`` in the reference's teacher mode.

    Everything in train mode (so BatchNorm normalises with the batch statistics and updates its
    running stats, as the reference does), except dropout and drop-path, which are off. With
    ``bn_eval`` BatchNorm layers use their running statistics instead.
    """
    model.train()
    for m in model.modules():
        if _is_dropout(m) or (bn_eval and isinstance(m, nn.modules.batchnorm._BatchNorm)):
            m.eval()


class EMATeacher(nn.Module):
    """A deep copy of the student whose parameters follow an EMA of the student's.

    Reference timeline: at step 0 the teacher is initialised from the student (``init_from``); at every
    step t >= 1, at the START of the step, ``update(student, t)`` with ``alpha_t = decay(t)``.

    Args:
        student: the model to copy (deep-copied once here).
        alpha: the EMA momentum cap (reference 0.999).
        update_buffers: also average floating buffers (and copy the others). Reference: False, the
            teacher keeps its own BatchNorm statistics.
        bn_eval: run the teacher's BatchNorm in eval mode. Reference: False (train mode).
    """

    def __init__(self, student: nn.Module, alpha: float = 0.999, update_buffers: bool = False,
                 bn_eval: bool = False) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"EMATeacher: alpha must be in [0, 1], got {alpha}")
        self.model = copy.deepcopy(student)
        self.alpha = float(alpha)
        self.update_buffers = update_buffers
        self.bn_eval = bn_eval
        for p in self.model.parameters():
            p.requires_grad_(False)
            p.grad = None

    def decay(self, step: int) -> float:
        """``alpha_t = min(1 - 1 / (step + 1), alpha)``: 0 at step 0, 0.5 at 1, the cap from 999 on."""
        return min(1.0 - 1.0 / (step + 1), self.alpha)

    def _pairs(self, student: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        t_params = list(self.model.parameters())
        s_params = [p.detach() for p in student.parameters()]
        if len(t_params) != len(s_params):
            raise ValueError("EMATeacher: the student and the teacher have different parameter lists")
        return t_params, s_params

    @torch.no_grad()
    def init_from(self, student: nn.Module) -> None:
        """Copy the student's parameters (not its buffers, as the reference) and freeze them."""
        t_params, s_params = self._pairs(student)
        for t, s in zip(t_params, s_params):
            t.requires_grad_(False)
            t.copy_(s)
        if self.update_buffers:
            for t, s in zip(self.model.buffers(), student.buffers()):
                t.copy_(s)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """``teacher <- a * teacher + (1 - a) * student`` with ``a = decay(step)``, over parameters."""
        a = self.decay(step)
        t_params, s_params = self._pairs(student)
        if t_params:
            torch._foreach_lerp_(t_params, s_params, 1.0 - a)
        if self.update_buffers:
            for t, s in zip(self.model.buffers(), student.buffers()):
                if t.is_floating_point():
                    t.lerp_(s.to(t.dtype), 1.0 - a)
                else:
                    t.copy_(s)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Any:
        """Teacher forward without gradients, dropout/drop-path off, BatchNorm as configured.

        Args:
            images: [B, 3, H, W] normalised images.

        Returns:
            The wrapped model's ``predict(images)`` (its test-time forward, e.g. HRDA's sliding detail
            windows), or its ``forward`` when it has no ``predict``.
        """
        set_teacher_modes(self.model, self.bn_eval)
        predict = getattr(self.model, "predict", None)
        return predict(images) if callable(predict) else self.model(images)

    def forward(self, images: Tensor) -> Any:
        return self.predict(images)

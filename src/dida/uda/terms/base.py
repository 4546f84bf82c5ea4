"""What a training term sees and may do: ``Term`` (the hooks) and ``StepContext`` (the step's state).

The step (``dida.uda.step.SelfTrainingStep``) is a fixed skeleton; a term plugs into it at these points,
each a method with a no-op default:

0. ``on_step_start(ctx)`` right after the EMA teacher's update, before any forward (e.g. a term's own
   teacher follows the same timeline).
1. ``on_source(ctx)`` after the student's source forward (``ctx.source_output``): losses returned here are
   backpropagated together with the source loss (e.g. the feature distance); side effects such as a bank
   update happen here too.
2. ``teacher_input(ctx, img)`` may replace the target image the teacher sees (e.g. a weak augmentation);
   ``refine_probs(ctx, probs, teacher_output)`` may refine the teacher's probabilities before they become
   pseudo-labels.
3. ``on_mixed(ctx)`` after the student's forward on the mixed image (``ctx.mixed``): losses returned here
   are backpropagated together with the mixed loss (e.g. DIDA's instance loss).
4. ``own_forward(ctx)`` after the mixed backward: a term that needs its own student forward (e.g. masked
   image consistency) runs it here (``ctx.forward(img)``); its losses get their own backward.

Loss keys are namespaced (``loss/<name>``); statistics go to ``ctx.stats`` (``stat/<name>``, detached
scalars) and debug images to ``ctx.debug`` when it is not None. A term never calls ``backward``, steps an
optimizer or writes files. Persistent state lives in buffers or submodules, so it moves with ``.to()`` and
is saved in checkpoints (``state_dict``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dida.models.base import BaseSegmentor, SegmentorOutput

__all__ = ["MixedBatch", "PseudoLabels", "StepContext", "Term", "TermBuildContext"]


@dataclass
class PseudoLabels:
    """The teacher's pseudo-labels on the target.

    Attributes:
        labels: ``[B, H, W]`` long.
        weight: ``[B, H, W]`` float, the un-mixed pixel weight (confidence fraction, zeroed margins).
        confident_fraction: scalar, the fraction of confident pixels.
        probs: ``[B, C, H, W]`` teacher probabilities at the crop size (after any ``refine_probs``).
        teacher_output: the teacher's ``predict`` output on ``view``.
        view: ``[B, 3, H, W]`` the image the teacher saw.
    """

    labels: Tensor
    weight: Tensor
    confident_fraction: Tensor
    probs: Tensor
    teacher_output: SegmentorOutput
    view: Tensor


@dataclass
class MixedBatch:
    """ClassMix of the source onto the target, strongly augmented, and the student's output on it.

    Attributes:
        image: ``[B, 3, H, W]``; labels: ``[B, H, W]`` long; weight: ``[B, H, W]``; mask: ``[B, H, W]`` bool
            (True where the pixel comes from the source); output: the student's forward output (None once
            the mixed backward has run).
    """

    image: Tensor
    labels: Tensor
    weight: Tensor
    mask: Tensor
    output: SegmentorOutput | None


@dataclass
class StepContext:
    """The state of one training step, passed to every term hook.

    Attributes:
        step: the 0-based iteration index.
        generator: CPU ``torch.Generator``, the step's source of randomness (besides dropout, which uses
            torch's global RNG as in the reference).
        student: the model being trained; teacher: the EMA teacher (None without self-training).
        batch: everything the loader delivered (on the device), e.g. ``valid_pseudo_mask``.
        source_img: ``[B, 3, H, W]``; source_label: ``[B, H, W]`` long.
        source_output: the student's source forward output (None after the source backward).
        target_img: ``[B, 3, H, W]`` or None without self-training.
        pseudo: the teacher's pseudo-labels (None without self-training).
        mixed: the mixed batch (None without self-training).
        stats: detached scalars to log; debug: tensors for the debug visualiser, or None.
        autocast: returns the context manager the step runs network forwards in.
        forward_model: the distributed wrapper of the student (``DistributedDataParallel``) or None.
        no_sync: returns the context a forward runs in: the wrapper's ``no_sync`` in every phase but the last
            (gradients are averaged over processes once, overlapped with the last backward), else a null one.
    """

    step: int
    generator: torch.Generator
    student: BaseSegmentor
    teacher: Any
    batch: dict[str, Any]
    source_img: Tensor
    source_label: Tensor
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    source_output: SegmentorOutput | None = None
    target_img: Tensor | None = None
    pseudo: PseudoLabels | None = None
    mixed: MixedBatch | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)
    debug: dict[str, Tensor] | None = None

    forward_model: nn.Module | None = None
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext

    def forward(self, img: Tensor) -> SegmentorOutput:
        """The student's training forward on ``img`` under the step's autocast (through the distributed wrapper
        when there is one; the step decides whether this forward's backward synchronises gradients)."""
        with self.autocast(), self.no_sync():
            return (self.forward_model or self.student)(img)

    @property
    def ignore_index(self) -> int:
        return int(getattr(self.student, "ignore_index", 255))


@dataclass
class TermBuildContext:
    """What a term's builder gets besides the configuration.

    Attributes:
        student: the model being trained (for its class count, embedding width, kind).
        device: where training runs (a term moves its own state there).
        seed: the run's seed.
    """

    student: BaseSegmentor
    device: torch.device
    seed: int


class Term(nn.Module):
    """Base class of training terms (see the module docstring for the hooks).

    Attributes:
        name: the term's name in ``dida.uda.terms.TERMS`` (set by the table's builder).
        needs_teacher: the term uses the teacher or the pseudo-labels, so it needs ``uda.self_training``
            (a class default; an instance may set its own, e.g. from its mode).
    """

    needs_teacher: bool = False
    name: str = ""

    def on_step_start(self, ctx: StepContext) -> None:
        return None

    def on_source(self, ctx: StepContext) -> dict[str, Tensor]:
        return {}

    def teacher_input(self, ctx: StepContext, img: Tensor) -> Tensor:
        return img

    def refine_probs(self, ctx: StepContext, probs: Tensor, teacher_output: SegmentorOutput) -> Tensor:
        return probs

    def on_mixed(self, ctx: StepContext) -> dict[str, Tensor]:
        return {}

    def own_forward(self, ctx: StepContext) -> dict[str, Tensor]:
        return {}

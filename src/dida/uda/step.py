"""One DACS self-training step: a fixed skeleton plus the enabled training terms.

The skeleton, in the reference's order (spec 4.6); the numbers are the hooks of ``dida.uda.terms.Term``:

1. EMA teacher: initialised from the student at step 0, else updated, at the START of the step; then
   every term's ``on_step_start`` (e.g. a term's own EMA teacher).
2. The strong augmentation's gates (colour jitter, blur), drawn once from the step's generator.
3. Source: student forward on the source crop, ``loss/src_ce`` = the model's own loss;
   ``on_source`` of every term (e.g. ``loss/feat_dist``, the DIDA bank update); ONE backward of the sum.
4. Pseudo-labels (self-training): ``teacher_input`` (e.g. a weak view), the teacher's ``predict`` on the
   target, softmax at the crop size, ``refine_probs``, argmax, and one confidence weight for the batch
   (the fraction of pixels >= ``pseudo_threshold``), zeroed on the ignored top / bottom rows and, when the
   loader delivers ``valid_pseudo_mask``, outside it.
5. ClassMix of the source onto the target (masks from the source labels), strong augmentation, student
   forward, ``loss/mix_ce`` = the model's loss with the mixed weight; ``on_mixed`` of every term (e.g.
   ``loss/instance``); ONE backward of the sum.
6. ``own_forward`` of every term (e.g. masked image consistency), each with its own backward.

The step never names a method: source-only training is ``self_training=False`` with no teacher; DAFormer
is self-training with the feature-distance term; DIDA adds the dual-level term. It never steps the
optimizer and writes no files. When ``backward`` is given, each phase's summed loss is passed to it right
after the phase (the reference's memory profile: each graph is freed before the next forward) and the
returned losses are detached; otherwise the losses keep their graphs and the caller may sum them (same
gradients).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from dida.models.base import BaseSegmentor
from dida.models.losses import seg_accuracy
from dida.models.ops import resize
from dida.uda.augment import AugmentGates, draw_gates, strong_augment
from dida.uda.ema import EMATeacher
from dida.uda.mixing import class_mix_masks, mix_batch
from dida.uda.pseudo_label import confident_fraction, pseudo_labels, pseudo_weight
from dida.uda.terms.base import MixedBatch, PseudoLabels, StepContext, Term

if TYPE_CHECKING:
    from dida.config import UDACfg

__all__ = ["BackwardFn", "SelfTrainingStep", "StepOutput", "build_step"]

# Called as ``backward(loss)``; e.g. ``lambda loss: scaler.scale(loss).backward()``.
BackwardFn = Callable[[Tensor], None]


@dataclass
class StepOutput:
    """What one step returns.

    Attributes:
        losses: ``loss/src_ce``, ``loss/mix_ce`` and the terms' losses (e.g. ``loss/feat_dist``,
            ``loss/instance``); scalars, detached when the step ran the backward passes, with graphs
            otherwise.
        stats: detached scalars for logging (``stat/src_acc`` in %, ``stat/pseudo_weight``, terms' stats).
        debug: detached tensors for the debug visualiser (``debug=True`` only), all ``[B, ...]``.
    """

    losses: dict[str, Tensor]
    stats: dict[str, Tensor]
    debug: dict[str, Tensor] | None = None


class SelfTrainingStep:
    """The DACS self-training skeleton with pluggable terms. See the module docstring.

    Build it with ``build_step`` from the configuration; the keyword arguments have no defaults of their
    own (``dida.config`` holds them).

    Args:
        student: the segmentor being trained (``dida.models.BaseSegmentor``), used in its current mode.
        teacher: the EMA teacher, or None for source-only training.
        terms: the training terms, in the order their hooks run.
        pseudo_threshold: confidence threshold of the pseudo-weight.
        pseudo_weight_ignore_top, pseudo_weight_ignore_bottom: target rows whose weight is zeroed.
        mix_classes: "batch_union" (reference quirk) or "per_image", see ``class_mix_masks``.
        color_jitter_strength, color_jitter_prob, blur: the strong augmentation.
        mean, std: the image normalisation (0..255 scale).
        autocast_device_type, autocast_dtype: run the network forwards under this autocast (None: leave
            whatever autocast context the caller set).
        ddp: the student wrapped in ``DistributedDataParallel`` (multi-process training), or None. The
            student's forwards run through it; every phase but the last runs under its ``no_sync``, so the
            gradients of all phases are averaged once, during the last backward.
    """

    def __init__(
        self,
        *,
        student: BaseSegmentor,
        teacher: EMATeacher | None,
        terms: Sequence[Term] | Mapping[str, Term],
        pseudo_threshold: float,
        pseudo_weight_ignore_top: int,
        pseudo_weight_ignore_bottom: int,
        mix_classes: Literal["batch_union", "per_image"],
        color_jitter_strength: float,
        color_jitter_prob: float,
        blur: bool,
        mean: Sequence[float],
        std: Sequence[float],
        autocast_device_type: str | None,
        autocast_dtype: torch.dtype | None,
        ddp: torch.nn.Module | None,
    ) -> None:
        self.terms: list[Term] = list(terms.values() if isinstance(terms, Mapping) else terms)
        if teacher is None and any(t.needs_teacher for t in self.terms):
            needy = [t.name or type(t).__name__ for t in self.terms if t.needs_teacher]
            raise ValueError(f"SelfTrainingStep: the terms {needy} need an EMA teacher (self-training)")
        if mix_classes not in ("batch_union", "per_image"):
            raise ValueError(f"SelfTrainingStep: mix_classes must be batch_union or per_image, got {mix_classes!r}")
        self.student = student
        self.teacher = teacher
        self.pseudo_threshold = float(pseudo_threshold)
        self.pseudo_weight_ignore_top = int(pseudo_weight_ignore_top)
        self.pseudo_weight_ignore_bottom = int(pseudo_weight_ignore_bottom)
        self.mix_classes = mix_classes
        self.color_jitter_strength = float(color_jitter_strength)
        self.color_jitter_prob = float(color_jitter_prob)
        self.blur = bool(blur)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.autocast_device_type = autocast_device_type
        self.autocast_dtype = autocast_dtype
        self.ddp = ddp

    @property
    def self_training(self) -> bool:
        return self.teacher is not None

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None or self.autocast_device_type is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.autocast_device_type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------------------------- stages

    def update_teacher(self, step: int) -> None:
        """Reference EMA timeline: initialise the teacher at step 0, else update it with ``alpha_t``."""
        assert self.teacher is not None
        if step == 0:
            self.teacher.init_from(self.student)
        else:
            self.teacher.update(self.student, step)

    def source_stage(self, ctx: StepContext, losses: dict[str, Tensor]) -> Tensor:
        """Student forward on the source, its loss and the terms' ``on_source``; returns the phase sum."""
        ctx.source_output = ctx.forward(ctx.source_img)
        out, label = ctx.source_output, ctx.source_label
        src = self.student.loss(out, label)
        losses["loss/src_ce"] = src
        ctx.stats["stat/src_acc"] = seg_accuracy(resize(out.logits.detach().float(), label.shape[-2:]), label)
        return _phase_sum(src, [term.on_source(ctx) for term in self.terms], losses)

    def pseudo_label_stage(self, ctx: StepContext) -> PseudoLabels:
        """Teacher prediction on the target (as the terms' ``teacher_input`` leaves it) -> labels, weight."""
        assert self.teacher is not None and ctx.target_img is not None
        view = ctx.target_img
        for term in self.terms:
            view = term.teacher_input(ctx, view)
        with self._autocast():
            out = self.teacher.predict(view)
        size = ctx.target_img.shape[-2:]
        with torch.no_grad():
            probs = torch.softmax(resize(out.logits.detach().float(), size), dim=1)
            for term in self.terms:
                probs = term.refine_probs(ctx, probs, out)
            labels, conf = pseudo_labels(probs)
            weight = pseudo_weight(conf, self.pseudo_threshold, self.pseudo_weight_ignore_top,
                                   self.pseudo_weight_ignore_bottom, ctx.batch.get("valid_pseudo_mask"))
            fraction = confident_fraction(conf, self.pseudo_threshold)
        return PseudoLabels(labels=labels, weight=weight, confident_fraction=fraction, probs=probs,
                            teacher_output=out, view=view)

    def mix_stage(self, ctx: StepContext, gates: AugmentGates) -> MixedBatch:
        """ClassMix the source onto the target, strong-augment, student forward."""
        assert ctx.pseudo is not None and ctx.target_img is not None
        with torch.no_grad():
            mask = class_mix_masks(ctx.source_label, ctx.generator, ctx.ignore_index,
                                   per_image=self.mix_classes == "per_image")
            image, labels, weight = mix_batch(mask, ctx.source_img, ctx.target_img, ctx.source_label,
                                              ctx.pseudo.labels, ctx.pseudo.weight)
            image = strong_augment(image, gates, ctx.generator, self.color_jitter_strength,
                                   self.color_jitter_prob, self.mean, self.std)
        return MixedBatch(image=image, labels=labels, weight=weight, mask=mask, output=ctx.forward(image))

    # --------------------------------------------------------------------------------------- call

    def __call__(self, batch: dict[str, Any], step: int, generator: torch.Generator,
                 backward: BackwardFn | None = None, debug: bool = False) -> StepOutput:
        """Run one step.

        Args:
            batch: ``img`` [B, 3, H, W] source, ``label`` [B, H, W] (or [B, 1, H, W]) long source labels,
                ``target_img`` [B, 3, H, W] (self-training only), optionally ``valid_pseudo_mask``
                [B, (1,) H, W]; none is modified.
            step: the 0-based iteration index (drives the EMA and the terms' schedules).
            generator: CPU ``torch.Generator``, the only source of the step's randomness besides the
                network's dropout (torch's global RNG, as in the reference).
            backward: called with each phase's summed loss in the reference order, or None.
            debug: also return debug tensors.
        """
        img, label = _check_batch(batch)
        ctx = StepContext(step=step, generator=generator, student=self.student, teacher=self.teacher,
                          batch=batch, source_img=img, source_label=label, autocast=self._autocast,
                          debug={} if debug else None)
        losses: dict[str, Tensor] = {}

        def run_backward(total: Tensor) -> None:
            if backward is not None:
                backward(total)

        phases = self._sync_schedule(ctx)
        if self.self_training:
            self.update_teacher(step)  # 1.
        for term in self.terms:
            term.on_step_start(ctx)
        gates = draw_gates(generator, self.blur)  # 2.
        next(phases)
        run_backward(self.source_stage(ctx, losses))  # 3.
        ctx.source_output = None
        if self.self_training:
            next(phases)
            self._self_training_phase(ctx, batch, gates, losses, run_backward)  # 4-5.
        for term in self.terms:  # 6.
            if _has_own_forward(term):
                next(phases)
            own = term.own_forward(ctx)
            if own:
                run_backward(_phase_sum(None, [own], losses))
        if ctx.debug is not None:
            ctx.debug.update({"source": img.detach(), "source_label": label.detach()})
        if backward is not None:
            losses = {k: v.detach() for k, v in losses.items()}
        return StepOutput(losses=losses, stats={k: v.detach() for k, v in ctx.stats.items()}, debug=ctx.debug)

    def _sync_schedule(self, ctx: StepContext) -> Iterator[None]:
        """Advanced before each phase's forward: sets ``ctx.no_sync`` so that only the last phase's backward
        averages gradients over processes (with ``ddp``)."""
        ctx.forward_model = self.ddp
        count = 1 + int(self.self_training) + sum(_has_own_forward(t) for t in self.terms)
        for phase in range(count):
            last = phase == count - 1
            ctx.no_sync = contextlib.nullcontext if self.ddp is None or last else self.ddp.no_sync  # type: ignore
            yield
        while True:  # a term that forwards more than once: all in the last phase
            yield

    def _self_training_phase(self, ctx: StepContext, batch: dict[str, Any], gates: AugmentGates,
                             losses: dict[str, Tensor], run_backward: Callable[[Tensor], None]) -> None:
        target_img = batch["target_img"]
        if target_img.shape != ctx.source_img.shape:
            raise ValueError(
                f"step: target_img {tuple(target_img.shape)} and img {tuple(ctx.source_img.shape)} differ")
        ctx.target_img = target_img
        ctx.pseudo = self.pseudo_label_stage(ctx)
        ctx.stats["stat/pseudo_weight"] = ctx.pseudo.confident_fraction
        ctx.mixed = self.mix_stage(ctx, gates)
        assert ctx.mixed.output is not None
        mix = self.student.loss(ctx.mixed.output, ctx.mixed.labels, ctx.mixed.weight)
        losses["loss/mix_ce"] = mix
        # The terms' mixed losses share the mixed forward's graph: one backward of the sum gives the
        # reference's gradients (up to float rounding) with one pass through the student instead of two.
        run_backward(_phase_sum(mix, [term.on_mixed(ctx) for term in self.terms], losses))
        ctx.mixed.output = None
        if ctx.debug is not None:
            ctx.debug.update({
                "target": ctx.pseudo.view.detach(), "pseudo_label": ctx.pseudo.labels,
                "pseudo_weight": ctx.pseudo.weight, "mix_mask": ctx.mixed.mask.float(),
                "mixed": ctx.mixed.image.detach(), "mixed_label": ctx.mixed.labels,
            })


def _has_own_forward(term: Term) -> bool:
    return type(term).own_forward is not Term.own_forward


def _phase_sum(first: Tensor | None, parts: Sequence[Mapping[str, Tensor]], losses: dict[str, Tensor]) -> Tensor:
    """Record the terms' losses of one phase in ``losses`` and return the phase's total."""
    total = first
    for part in parts:
        for key, value in part.items():
            if key in losses:
                raise ValueError(f"step: two terms return the loss {key!r}")
            losses[key] = value
            total = value if total is None else total + value
    assert total is not None
    return total


def _check_batch(batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    img, label = batch["img"], batch["label"]
    if label.dim() == 4 and label.shape[1] == 1:
        label = label[:, 0]
    if img.dim() != 4 or label.dim() != 3 or img.shape[0] != label.shape[0]:
        raise ValueError(f"step: expected img [B, 3, H, W] and label [B, H, W], got {tuple(img.shape)} "
                         f"and {tuple(label.shape)}")
    return img, label.long()


def build_step(cfg: UDACfg, *, student: BaseSegmentor, teacher: EMATeacher | None,
               terms: Sequence[Term] | Mapping[str, Term], amp: str = "off",
               device_type: str | None = None, ddp: torch.nn.Module | None = None) -> SelfTrainingStep:
    """Translate ``dida.config.UDACfg`` into a ``SelfTrainingStep`` around the given models and terms.

    Args:
        amp: "off" (forwards inherit the caller's autocast context), "bf16" or "fp16" to make the step open
            its own autocast context on ``device_type`` (default: the student's device).
    """
    from dida.constants import IMG_MEAN, IMG_STD
    from dida.runtime import amp_dtype

    dtype = amp_dtype(amp)
    if dtype is not None and device_type is None:
        device_type = next(student.parameters()).device.type
    aug = cfg.augment
    return SelfTrainingStep(
        student=student, teacher=teacher, terms=terms, pseudo_threshold=cfg.pseudo_threshold,
        pseudo_weight_ignore_top=cfg.pseudo_weight_ignore_top,
        pseudo_weight_ignore_bottom=cfg.pseudo_weight_ignore_bottom, mix_classes=cfg.mix_classes,
        color_jitter_strength=aug.color_jitter_strength, color_jitter_prob=aug.color_jitter_prob, blur=aug.blur,
        mean=IMG_MEAN, std=IMG_STD, autocast_device_type=device_type, autocast_dtype=dtype, ddp=ddp,
    )

"""MIC's masked image consistency as a training term (hrda_mic.md 4; ``uda.mic``).

After the mixed backward (``own_forward``), the student sees a block-masked copy of some images and is
trained against their labels with its own loss (``BaseSegmentor.loss_terms``: on HRDA the full
multi-resolution loss with its own new detail crop):

1. Images, labels, weights by ``mode`` (spec 4.3): ``separatetrg(aug)`` the target batch with the
   teacher's pseudo-labels and the UN-MIXED pseudo-weight (confidence fraction x margins / validity mask);
   ``separatesrc(aug)`` the source batch with its labels and no weight (no teacher needed);
   ``separate(aug)`` ``[source 0, target 0]`` with ``[labels 0, pseudo-labels 0]`` and weights
   ``[ones, pseudo-weight 0]`` (the reference asserts a batch of 2 and uses image 0 of each domain, Q15).
2. "...aug" modes (spec 4.4): fresh gates ``u_cj, u_b`` from the step's generator; colour jitter if
   ``u_cj > uda.augment.color_jitter_prob`` (per-image factors, ONE op order for the call), then a
   Gaussian blur if ``u_b > 0.5`` with ONE sigma for the batch; the blur gate ignores
   ``uda.augment.blur`` (Q13). Both quirks are options (``blur_gate``, ``blur_sigma``).
3. The block mask (``dida.uda.masking``), drawn after the augmentation, so masked pixels are exactly the
   mean colour (Q16).
4. ``loss/mic`` = the model's loss terms on the masked images, ``mask_lambda`` scaling only ``"seg"``
   (Q12, ``lambda_scope="seg_only"``) or all of them (``"all"``).

Teacher (spec 4.5): by default the DACS teacher's pseudo-labels of the step are reused (the reference's
``'same'/'same'``). A separate ``EMATeacher`` (a submodule, so it is checkpointed) is built when its own
``alpha``, ``pseudo_threshold`` or no confidence weighting is asked for (the reference's ablations): it
follows the DACS timeline (copied from the student at step 0, else updated with
``min(1 - 1/(t+1), alpha)``) and predicts on the un-augmented target with the same margins / validity mask.
Its update runs in ``own_forward``, before its prediction: the student's parameters have not changed
since the start of the step (the optimizer steps after it), so the parameter EMA equals the reference's
update at the start of the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor

from dida.models.losses import seg_accuracy
from dida.models.ops import resize
from dida.uda.augment import AugmentGates, color_jitter, draw_gates, gaussian_blur, uniform
from dida.uda.ema import EMATeacher
from dida.uda.masking import block_mask, mask_image
from dida.uda.pseudo_label import pseudo_labels, pseudo_weight
from dida.uda.terms.base import StepContext, Term, TermBuildContext

if TYPE_CHECKING:
    from dida.config import Config

__all__ = ["MICMode", "MaskedConsistencyTerm", "build", "color_augment"]

MICMode = Literal["separate", "separateaug", "separatesrc", "separatesrcaug", "separatetrg", "separatetrgaug"]

def color_augment(images: Tensor, gates: AugmentGates, generator: torch.Generator, *, strength: float,
                  prob: float, blur_sigma: Literal["per_batch", "per_image"], mean: Sequence[float],
                  std: Sequence[float]) -> Tensor:
    """MIC's colour augmentation of the images to be masked: jitter, then blur (spec 4.4).

    Jitter runs when ``gates.color_jitter > prob`` (one op order for the batch, as kornia's ``ColorJitter``
    called once on it); blur when
    ``gates.blur > 0.5`` with sigma ~ U(0.15, 1.15), one for the batch (``"per_batch"``, the reference,
    Q13) or one per image, and the kernel size rule of ``dida.uda.augment.blur_kernel_size``.

    Args:
        images: ``[B, 3, H, W]`` normalised images (not modified).

    Returns:
        ``[B, 3, H, W]``, always a new tensor.
    """
    out = images
    if gates.color_jitter > prob:
        out = color_jitter(out, strength, generator, mean, std, one_order=True)
    if gates.blur > 0.5:
        sigma = uniform(1 if blur_sigma == "per_batch" else out.shape[0], 0.15, 1.15, generator)
        out = gaussian_blur(out, sigma.expand(out.shape[0]))
    return out if out is not images else images.clone()


class MaskedConsistencyTerm(Term):
    """MIC's masked image consistency (see the module docstring).

    Args:
        mode: which images are masked (``MICMode``); "...aug" adds the colour augmentation.
        block_size, ratio: the block mask (``dida.uda.masking.block_mask``).
        mask_lambda: the loss weight; lambda_scope: "seg_only" (Q12) or "all" loss terms it scales.
        blur_gate: "always" (Q13: blur even when ``blur`` is off) or "follow_blur".
        blur_sigma: "per_batch" (Q13) or "per_image".
        blur: ``uda.augment.blur`` (read only with ``blur_gate="follow_blur"``).
        color_jitter_strength, color_jitter_prob: the jitter's strength and gate threshold.
        mean, std: the image normalisation (0..255 scale).
        teacher: a separate MIC teacher (a submodule), or None to reuse the step's pseudo-labels.
        pseudo_threshold: the separate teacher's confidence threshold, None for weight 1 everywhere.
        pseudo_weight_ignore_top, pseudo_weight_ignore_bottom: rows zeroed in the separate teacher's weight.
    """

    def __init__(self, *, mode: MICMode, block_size: int, ratio: float, mask_lambda: float,
                 lambda_scope: Literal["seg_only", "all"], blur_gate: Literal["always", "follow_blur"],
                 blur_sigma: Literal["per_batch", "per_image"], blur: bool, color_jitter_strength: float,
                 color_jitter_prob: float, mean: Sequence[float], std: Sequence[float],
                 teacher: EMATeacher | None, pseudo_threshold: float | None, pseudo_weight_ignore_top: int,
                 pseudo_weight_ignore_bottom: int) -> None:
        super().__init__()
        if mode not in get_args(MICMode):
            raise ValueError(f"MaskedConsistencyTerm: unknown mode {mode!r}; known: {get_args(MICMode)}")
        if block_size < 1 or not 0.0 <= ratio <= 1.0 or mask_lambda < 0:
            raise ValueError("MaskedConsistencyTerm: need block_size >= 1, ratio in [0, 1], mask_lambda >= 0, "
                             f"got {block_size}, {ratio}, {mask_lambda}")
        if lambda_scope not in ("seg_only", "all") or blur_gate not in ("always", "follow_blur") or \
                blur_sigma not in ("per_batch", "per_image"):
            raise ValueError(f"MaskedConsistencyTerm: bad option {lambda_scope!r} / {blur_gate!r} / {blur_sigma!r}")
        self.mode: MICMode = mode
        self.domain: Literal["both", "source", "target"] = (
            "source" if "src" in mode else "target" if "trg" in mode else "both")
        self.augment = mode.endswith("aug")
        if teacher is not None and self.domain == "source":
            raise ValueError(f"MaskedConsistencyTerm: mode {mode!r} masks source images only; it has no use for "
                             "a separate teacher")
        self.needs_teacher = self.domain != "source"
        self.block_size = int(block_size)
        self.ratio = float(ratio)
        self.mask_lambda = float(mask_lambda)
        self.lambda_scope: Literal["seg_only", "all"] = lambda_scope
        self.blur_gate: Literal["always", "follow_blur"] = blur_gate
        self.blur_sigma: Literal["per_batch", "per_image"] = blur_sigma
        self.blur = bool(blur)
        self.color_jitter_strength = float(color_jitter_strength)
        self.color_jitter_prob = float(color_jitter_prob)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.teacher = teacher
        self.pseudo_threshold = None if pseudo_threshold is None else float(pseudo_threshold)
        self.pseudo_weight_ignore_top = int(pseudo_weight_ignore_top)
        self.pseudo_weight_ignore_bottom = int(pseudo_weight_ignore_bottom)

    # ------------------------------------------------------------------------------------- pieces

    @torch.no_grad()
    def on_step_start(self, ctx: StepContext) -> None:
        """The separate teacher's EMA timeline, at the start of the step after the DACS teacher (spec 4.5): a
        copy of the student at step 0, else ``update(student, t)``."""
        if self.teacher is None:
            return
        if ctx.step == 0:
            self.teacher.init_from(ctx.student)
        else:
            self.teacher.update(ctx.student, ctx.step)

    @torch.no_grad()
    def teacher_pseudo_labels(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """The separate teacher's pseudo-labels on the raw (un-augmented) target.

        Returns:
            labels ``[B, H, W]`` long, weight ``[B, H, W]`` (confidence fraction or 1, margins and the
            loader's ``valid_pseudo_mask`` zeroed).
        """
        assert self.teacher is not None and ctx.target_img is not None
        with ctx.autocast():
            out = self.teacher.predict(ctx.target_img)
        probs = torch.softmax(resize(out.logits.detach().float(), ctx.target_img.shape[-2:]), dim=1)
        labels, confidence = pseudo_labels(probs)
        # threshold None (the reference's mask_pseudo_threshold None): weight 1, margins still zeroed
        weight = pseudo_weight(confidence, self.pseudo_threshold, self.pseudo_weight_ignore_top,
                               self.pseudo_weight_ignore_bottom, ctx.batch.get("valid_pseudo_mask"))
        return labels, weight

    def select(self, ctx: StepContext) -> tuple[Tensor, Tensor, Tensor | None]:
        """Images, labels and weights to mask, by ``mode`` (spec 4.3).

        Returns:
            images ``[N, 3, H, W]``, labels ``[N, H, W]`` long, weights ``[N, H, W]`` or None; N is the
            batch size, or 2 for the "separate" modes.
        """
        if self.domain == "source":
            return ctx.source_img, ctx.source_label, None
        if ctx.target_img is None or (self.teacher is None and ctx.pseudo is None):
            raise ValueError(f"MIC mode {self.mode!r} needs the target and the teacher (uda.self_training)")
        if self.teacher is not None:
            labels, weight = self.teacher_pseudo_labels(ctx)
        else:
            assert ctx.pseudo is not None
            labels, weight = ctx.pseudo.labels, ctx.pseudo.weight  # un-mixed: the mixed weight is a new tensor
        if self.domain == "target":
            return ctx.target_img, labels, weight
        if ctx.source_img.shape[0] != 2:
            raise ValueError(f"MIC mode {self.mode!r}: the reference masks image 0 of the source and of the target "
                             f"batch and asserts a batch of 2 (quirk Q15); got {ctx.source_img.shape[0]}")
        images = torch.stack([ctx.source_img[0], ctx.target_img[0]])
        label = torch.stack([ctx.source_label[0], labels[0]])
        weights = torch.stack([torch.ones_like(weight[0]), weight[0]])
        return images, label, weights

    def masked_images(self, ctx: StepContext, images: Tensor) -> Tensor:
        """Colour augmentation ("...aug" modes, fresh gates from ``ctx.generator``), then the block mask."""
        with torch.no_grad():
            if self.augment:
                gates = draw_gates(ctx.generator, blur=self.blur or self.blur_gate == "always")
                images = color_augment(images, gates, ctx.generator, strength=self.color_jitter_strength,
                                       prob=self.color_jitter_prob, blur_sigma=self.blur_sigma,
                                       mean=self.mean, std=self.std)
            mask = block_mask(images.shape, self.block_size, self.ratio, ctx.generator, device=images.device)
            return mask_image(images, mask)

    def combine(self, parts: dict[str, Tensor]) -> Tensor:
        """``mask_lambda`` times ``"seg"`` (Q12) or times every part, plus the other parts."""
        total: Tensor | None = None
        for key, value in parts.items():
            if self.mask_lambda != 1.0 and (self.lambda_scope == "all" or key == "seg"):
                value = value * self.mask_lambda
            total = value if total is None else total + value
        if total is None:
            raise ValueError("MIC: the model's loss_terms returned nothing")
        return total

    # --------------------------------------------------------------------------------------- hook

    def own_forward(self, ctx: StepContext) -> dict[str, Tensor]:
        """One student forward on the masked images; returns ``{"loss/mic": ...}``."""
        images, labels, weights = self.select(ctx)
        masked = self.masked_images(ctx, images)
        out = ctx.forward(masked)
        parts = ctx.student.loss_terms(out, labels, weights)
        loss = self.combine(parts)
        with torch.no_grad():
            logits = resize(out.logits.detach().float(), labels.shape[-2:])
            ctx.stats["stat/mic_acc"] = seg_accuracy(logits, labels)
            if len(parts) > 1:
                for key, value in parts.items():
                    ctx.stats[f"stat/mic_{key}"] = value.detach()
            if ctx.debug is not None:
                ctx.debug["mic_masked"] = masked.detach()
                ctx.debug["mic_pred"] = logits.argmax(dim=1)
        return {"loss/mic": loss}


def _separate_teacher(cfg: Config, student: torch.nn.Module) -> tuple[EMATeacher | None, float | None]:
    """The reference builds a separate MIC teacher when ``mask_alpha`` or ``mask_pseudo_threshold`` is
    not ``'same'``; unset values then fall back to the DACS teacher's."""
    mic, ema = cfg.uda.mic, cfg.uda.ema
    if mic.alpha is None and mic.pseudo_threshold is None and mic.confidence_weight:
        return None, None
    alpha = ema.alpha if mic.alpha is None else mic.alpha
    threshold = cfg.uda.pseudo_threshold if mic.pseudo_threshold is None else mic.pseudo_threshold
    teacher = EMATeacher(student, alpha=alpha, update_buffers=ema.update_buffers, bn_eval=ema.teacher_bn_eval)
    return teacher, (threshold if mic.confidence_weight else None)


def build(cfg: Config, ctx: TermBuildContext) -> MaskedConsistencyTerm:
    """The term from ``uda.mic`` (jitter strength/probability and the blur flag from ``uda.augment``)."""
    from dida.constants import IMG_MEAN, IMG_STD
    from dida.errors import ConfigError

    mic, aug = cfg.uda.mic, cfg.uda.augment
    teacher, threshold = _separate_teacher(cfg, ctx.student)
    if teacher is not None and "src" in mic.mode:
        raise ConfigError(f"uda.mic.alpha / pseudo_threshold / confidence_weight: mode {mic.mode} masks source "
                          "images only and uses no teacher; leave them at null / null / true.")
    return MaskedConsistencyTerm(
        mode=mic.mode, block_size=mic.block_size, ratio=mic.ratio, mask_lambda=mic.mask_lambda,
        lambda_scope=mic.lambda_scope, blur_gate=mic.blur_gate, blur_sigma=mic.blur_sigma, blur=aug.blur,
        color_jitter_strength=aug.color_jitter_strength, color_jitter_prob=aug.color_jitter_prob,
        mean=IMG_MEAN, std=IMG_STD, teacher=teacher, pseudo_threshold=threshold,
        pseudo_weight_ignore_top=cfg.uda.pseudo_weight_ignore_top,
        pseudo_weight_ignore_bottom=cfg.uda.pseudo_weight_ignore_bottom)

"""One DACS self-training step (source-only, DAFormer or DIDA), decomposed into small stages.

Reference order inside one iteration (spec 4.6), each stage a method below:

1. ``update_teacher``: EMA initialisation (step 0) or update (step >= 1), at the START of the step.
2. Draw the strong-augmentation gates (and the weak ones) from the step's generator.
3. ``source_stage``: student on the source crop -> ``loss/src_ce``.
4. ``bank_stage`` (DIDA, every ``bank_update_interval`` steps): bank EMA from the source embedding.
5. backward(src) when a ``backward`` callable is given.
6. ``feature_distance_stage``: frozen ImageNet features vs the student's stage-4 features on thing
   classes -> ``loss/feat_dist``; backward.
7-9. ``pseudo_label_stage``: (optional weak view) teacher on the target -> pseudo-labels and weight.
9-10. ``mix_stage``: ClassMix, strong augmentation, student on the mixed crop -> ``loss/mix_ce``; backward
    (DIDA: after step 13, of the sum with the instance loss, one pass through the shared forward).
11-13. ``instance_stage`` (DIDA): the calibrated instance loss -> ``loss/instance``; backward.

The step never steps the optimizer and writes no files. When ``backward`` is given, each loss is
passed to it right after it is computed (DAFormer's memory profile) and the returned losses are
detached; otherwise the losses keep their graphs and the caller may sum them (same gradients).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dida.constants import IGNORE_INDEX, IMG_MEAN, IMG_STD, THING_CLASSES
from dida.uda.augment import AugmentGates, draw_gates, strong_augment, weak_augment
from dida.uda.ema import EMATeacher
from dida.uda.feature_distance import feature_distance_loss, thing_mask
from dida.uda.losses import seg_accuracy, seg_ce
from dida.uda.mixing import class_mix_masks, mix_batch
from dida.uda.pseudo_label import confident_fraction, pseudo_labels, pseudo_weight

if TYPE_CHECKING:
    from dida.config import UDACfg
    from dida.uda.instance_bank import InstanceBank

__all__ = ["StepOutput", "SelfTrainingStep", "build_step", "BackwardFn"]

Method = Literal["source_only", "daformer", "dida"]
# Called as ``backward(loss, retain_graph=...)``; e.g. ``scaler.scale(loss).backward(retain_graph=...)``.
BackwardFn = Callable[..., None]


@dataclass
class StepOutput:
    """What one step returns.

    Attributes:
        losses: ``loss/src_ce``, ``loss/feat_dist``, ``loss/mix_ce``, ``loss/instance`` (those that ran);
            scalars, detached when the step ran the backward passes, with graphs otherwise.
        stats: detached scalars for logging (``stat/src_acc`` in %, ``stat/pseudo_weight``).
        debug: detached tensors for the debug visualiser (``debug=True`` only), all ``[B, ...]``.
    """

    losses: dict[str, Tensor]
    stats: dict[str, Tensor]
    debug: dict[str, Tensor] | None = None


@dataclass
class _SourceResult:
    output: Any  # SegmentorOutput at network resolution
    loss: Tensor
    accuracy: Tensor


@dataclass
class _PseudoLabels:
    labels: Tensor  # [B, H, W] long
    weight: Tensor  # [B, H, W] float
    confident_fraction: Tensor  # scalar
    teacher_embedding: Tensor  # [B, D, h, w]
    view: Tensor  # [B, 3, H, W] the image the teacher saw


@dataclass
class _MixResult:
    output: Any
    loss: Tensor
    image: Tensor
    labels: Tensor
    weight: Tensor
    mask: Tensor


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize (align_corners=False) in float32; no-op when the size matches."""
    x = x.float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _features(model: nn.Module, img: Tensor) -> list[Tensor]:
    """The 4 backbone maps of a Segmentor (``extract_features``) or of a bare backbone (``forward``)."""
    if hasattr(model, "extract_features"):
        return model.extract_features(img)
    return model(img)


class SelfTrainingStep:
    """The DACS self-training step with DAFormer's and DIDA's terms. See the module docstring.

    Args:
        student: the segmentor being trained (returns ``SegmentorOutput``); used in its current mode.
        teacher: the EMA teacher (None for ``source_only``).
        imnet_model: the frozen ImageNet backbone or segmentor for the feature distance (None: no FD).
        bank: DIDA's instance bank (``method="dida"`` only).
        method: "source_only", "daformer" or "dida".
        num_classes: number of classes C.
        pseudo_threshold: confidence threshold of the pseudo-weight (reference 0.968).
        pseudo_weight_ignore_top, pseudo_weight_ignore_bottom: target rows whose weight is zeroed.
        mix_classes: "batch_union" (reference quirk) or "per_image", see ``class_mix_masks``.
        feature_distance: enable the ImageNet feature distance (needs ``imnet_model``).
        feature_distance_weight: its weight (reference 0.005).
        feature_distance_classes: classes of the thing mask (None: every cell).
        feature_distance_min_ratio: minimal class purity of a cell.
        feature_distance_empty: "zero" or "nan" (reference) when no cell is selected.
        color_jitter_strength, color_jitter_prob, blur: strong augmentation settings.
        bank_update_interval: bank update every this many steps (reference 50, incl. step 0).
        bank_momentum: bank EMA momentum (reference 0.999).
        bank_class_mean: "reference" or "per_image" (see ``InstanceBank.update``).
        bank_absent: "decay" (reference) or "skip".
        instance_weight: weight of the instance loss (reference 0.5).
        calibrate: use the calibrated "gather" target (reference True).
        a_smooth: < 1 enables the "scatter" refinement of the semantic pseudo-labels (reference 1.0).
        weak_augment: apply DIDA's intended weak view to the target before the teacher (reference: off,
            the original's weak view is a no-op).
        chunk_rows: rows per chunk of the memory-bounded DIDA terms (0: direct computation).
        mean, std: the image normalisation (0..255 scale).
        ignore_index: the ignore label.
        autocast_device_type, autocast_dtype: run the network forwards under this autocast (None: leave
            whatever autocast context the caller set).
    """

    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: EMATeacher | None,
        imnet_model: nn.Module | None,
        bank: InstanceBank | None,
        method: Method = "daformer",
        num_classes: int,
        pseudo_threshold: float = 0.968,
        pseudo_weight_ignore_top: int = 15,
        pseudo_weight_ignore_bottom: int = 120,
        mix_classes: Literal["batch_union", "per_image"] = "batch_union",
        feature_distance: bool = True,
        feature_distance_weight: float = 0.005,
        feature_distance_classes: Sequence[int] | None = THING_CLASSES,
        feature_distance_min_ratio: float = 0.75,
        feature_distance_empty: Literal["zero", "nan"] = "zero",
        color_jitter_strength: float = 0.2,
        color_jitter_prob: float = 0.2,
        blur: bool = True,
        bank_update_interval: int = 50,
        bank_momentum: float = 0.999,
        bank_class_mean: Literal["reference", "per_image"] = "reference",
        bank_absent: Literal["decay", "skip"] = "decay",
        instance_weight: float = 0.5,
        calibrate: bool = True,
        a_smooth: float = 1.0,
        weak_augment: bool = False,
        chunk_rows: int = 64,
        mean: Sequence[float] = IMG_MEAN,
        std: Sequence[float] = IMG_STD,
        ignore_index: int = IGNORE_INDEX,
        autocast_device_type: str | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        if method not in ("source_only", "daformer", "dida"):
            raise ValueError(
                f"SelfTrainingStep: method must be source_only, daformer or dida, got {method!r}")
        if method != "source_only" and teacher is None:
            raise ValueError(f"SelfTrainingStep: method {method!r} needs an EMA teacher")
        if method == "dida" and bank is None:
            raise ValueError("SelfTrainingStep: method 'dida' needs an instance bank")
        if method != "source_only" and feature_distance and imnet_model is None:
            raise ValueError("SelfTrainingStep: the feature distance is enabled but no imnet_model was given")
        if mix_classes not in ("batch_union", "per_image"):
            raise ValueError(
                f"SelfTrainingStep: mix_classes must be batch_union or per_image, got {mix_classes!r}")
        if bank_update_interval < 1:
            raise ValueError(
                f"SelfTrainingStep: bank_update_interval must be >= 1, got {bank_update_interval}")
        self.student = student
        self.teacher = teacher
        self.imnet_model = imnet_model
        self.bank = bank
        self.method: Method = method
        self.num_classes = int(num_classes)
        self.pseudo_threshold = float(pseudo_threshold)
        self.pseudo_weight_ignore_top = int(pseudo_weight_ignore_top)
        self.pseudo_weight_ignore_bottom = int(pseudo_weight_ignore_bottom)
        self.mix_classes = mix_classes
        self.feature_distance = bool(feature_distance) and method != "source_only"
        self.feature_distance_weight = float(feature_distance_weight)
        self.feature_distance_classes = (
            None if feature_distance_classes is None else tuple(int(c) for c in feature_distance_classes))
        self.feature_distance_min_ratio = float(feature_distance_min_ratio)
        self.feature_distance_empty = feature_distance_empty
        self.color_jitter_strength = float(color_jitter_strength)
        self.color_jitter_prob = float(color_jitter_prob)
        self.blur = bool(blur)
        self.bank_update_interval = int(bank_update_interval)
        self.bank_momentum = float(bank_momentum)
        self.bank_class_mean = bank_class_mean
        self.bank_absent = bank_absent
        self.instance_weight = float(instance_weight)
        self.calibrate = bool(calibrate)
        self.a_smooth = float(a_smooth)
        self.weak_augment = bool(weak_augment)
        self.chunk_rows = int(chunk_rows)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.ignore_index = int(ignore_index)
        self.autocast_device_type = autocast_device_type
        self.autocast_dtype = autocast_dtype

    # ------------------------------------------------------------------------------------ helpers

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None or self.autocast_device_type is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.autocast_device_type, dtype=self.autocast_dtype)

    @staticmethod
    def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(device_type=device.type, enabled=False)

    # ------------------------------------------------------------------------------------- stages

    def update_teacher(self, step: int) -> None:
        """Reference EMA timeline: initialise the teacher at step 0, else update it with ``alpha_t``."""
        assert self.teacher is not None
        if step == 0:
            self.teacher.init_from(self.student)
        else:
            self.teacher.update(self.student, step)

    def source_stage(self, img: Tensor, label: Tensor) -> _SourceResult:
        """Student forward on the source crop; CE at label size (mean over all pixels).

        Args:
            img: [B, 3, H, W]; label: [B, H, W] long.
        """
        with self._autocast():
            out = self.student(img)
        logits = _resize(out.logits, label.shape[-2:])
        loss = seg_ce(logits, label, ignore_index=self.ignore_index)
        return _SourceResult(output=out, loss=loss, accuracy=seg_accuracy(logits.detach(), label))

    def bank_stage(self, embedding: Tensor, label: Tensor, step: int) -> bool:
        """DIDA's bank EMA toward source class means, every ``bank_update_interval`` steps (step 0 too).

        Args:
            embedding: student source embedding [B, D, h, w] (detached here).
            label: source ground truth [B, H, W].

        Returns:
            Whether the bank was updated.
        """
        if self.bank is None or step % self.bank_update_interval != 0:
            return False
        with torch.no_grad(), self._no_autocast(embedding.device):
            self.bank.update(embedding.detach().float(), label, self.bank_momentum,
                             class_mean=self.bank_class_mean, absent=self.bank_absent)
        return True

    def feature_distance_stage(self, img: Tensor, label: Tensor,
                               student_features: Sequence[Tensor]) -> Tensor:
        """ImageNet feature distance on the last backbone stage, over thing-class cells.

        Args:
            img: [B, 3, H, W] source images; label: [B, H, W];
            student_features: the student's 4 backbone maps from the source forward.

        Returns:
            Scalar ``weight * mean ||f_student - f_imnet||_2`` over the selected cells.
        """
        assert self.imnet_model is not None
        with torch.no_grad():
            self.imnet_model.eval()
            with self._autocast():
                imnet_feat = _features(self.imnet_model, img)[-1].detach()
        feat = student_features[-1]
        mask = None
        if self.feature_distance_classes is not None:
            # Feature-map-relative scale (32 for MiT's last stage), derived like the reference (widths).
            scale = label.shape[-1] // feat.shape[-1]
            mask = thing_mask(label, scale, self.feature_distance_min_ratio, self.num_classes,
                              self.feature_distance_classes, self.ignore_index)
            if mask.shape[-2:] != feat.shape[-2:]:
                raise ValueError(
                    f"feature distance: the {tuple(label.shape[-2:])} label map downscaled by {scale} gives "
                    f"{tuple(mask.shape[-2:])} cells, but the feature map is {tuple(feat.shape[-2:])}. "
                    "Use a crop size divisible by the backbone's output stride (32).")
        return feature_distance_loss(feat, imnet_feat, mask, self.feature_distance_weight,
                                     self.feature_distance_empty)

    def pseudo_label_stage(self, target_img: Tensor, weak_gates: AugmentGates,
                           generator: torch.Generator) -> _PseudoLabels:
        """Teacher prediction on the target (optionally on the weak view) -> pseudo-labels and weight.

        Args:
            target_img: [B, 3, H, W] (never modified).
        """
        assert self.teacher is not None
        view = target_img
        if self.weak_augment:
            view = weak_augment(target_img, weak_gates, generator, self.color_jitter_strength,
                                self.color_jitter_prob, self.mean, self.std)
        with self._autocast():
            out = self.teacher.predict(view)
        size = target_img.shape[-2:]
        with torch.no_grad():
            probs = torch.softmax(_resize(out.logits.detach(), size), dim=1)
            if self.bank is not None and self.a_smooth < 1:
                from dida.uda.dual_level import semantic_term

                probs = semantic_term(self.bank, probs, out.embedding, self.a_smooth, self.chunk_rows)
            labels, conf = pseudo_labels(probs)
            weight = pseudo_weight(conf, self.pseudo_threshold, self.pseudo_weight_ignore_top,
                                   self.pseudo_weight_ignore_bottom)
            fraction = confident_fraction(conf, self.pseudo_threshold)
        return _PseudoLabels(labels=labels, weight=weight, confident_fraction=fraction,
                             teacher_embedding=out.embedding.detach(), view=view)

    def mix_stage(self, img: Tensor, label: Tensor, target_img: Tensor, pseudo: _PseudoLabels,
                  gates: AugmentGates, generator: torch.Generator) -> _MixResult:
        """ClassMix the source onto the target, strong-augment, student forward, weighted CE.

        Args:
            img, target_img: [B, 3, H, W]; label: [B, H, W]; pseudo: from ``pseudo_label_stage``.
        """
        with torch.no_grad():
            mask = class_mix_masks(label, generator, self.ignore_index,
                                   per_image=self.mix_classes == "per_image")
            mixed_img, mixed_label, mixed_weight = mix_batch(mask, img, target_img, label, pseudo.labels,
                                                             pseudo.weight)
            mixed_img = strong_augment(mixed_img, gates, generator, self.color_jitter_strength,
                                       self.color_jitter_prob, self.mean, self.std)
        with self._autocast():
            out = self.student(mixed_img)
        logits = _resize(out.logits, label.shape[-2:])
        loss = seg_ce(logits, mixed_label, mixed_weight, ignore_index=self.ignore_index)
        return _MixResult(output=out, loss=loss, image=mixed_img, labels=mixed_label, weight=mixed_weight,
                          mask=mask)

    def instance_stage(self, pseudo: _PseudoLabels, mixed: _MixResult, out_size: Sequence[int]) -> Tensor:
        """DIDA's instance loss: teacher-target similarity calibrated by the student's mixed logits,
        against the student's mixed-image similarity (spec 6.5-6.7), at ``out_size``."""
        from dida.uda.dual_level import instance_term

        assert self.bank is not None
        return instance_term(self.bank, pseudo.teacher_embedding, mixed.output.embedding,
                             mixed.output.logits.detach(), out_size=(int(out_size[0]), int(out_size[1])),
                             weight=self.instance_weight, calibrate=self.calibrate,
                             chunk_rows=self.chunk_rows)

    # --------------------------------------------------------------------------------------- call

    def __call__(self, batch: dict[str, Any], step: int, generator: torch.Generator,
                 backward: BackwardFn | None = None, debug: bool = False) -> StepOutput:
        """Run one step.

        Args:
            batch: ``img`` [B, 3, H, W] source, ``label`` [B, H, W] (or [B, 1, H, W]) long source labels,
                ``target_img`` [B, 3, H, W] (not needed for ``source_only``); none is modified.
            step: the 0-based iteration index (drives the EMA and bank schedules).
            generator: CPU ``torch.Generator``, the only source of the step's randomness besides the
                network's dropout (torch's global RNG, as in the reference).
            backward: ``backward(loss, retain_graph=...)`` called per stage in the reference order (DIDA's
                mix and instance losses as one sum), or None.
            debug: also return debug tensors.
        """
        img, label = batch["img"], batch["label"]
        if label.dim() == 4 and label.shape[1] == 1:
            label = label[:, 0]
        if img.dim() != 4 or label.dim() != 3 or img.shape[0] != label.shape[0]:
            raise ValueError(f"step: expected img [B, 3, H, W] and label [B, H, W], got {tuple(img.shape)} "
                             f"and {tuple(label.shape)}")
        label = label.long()
        losses: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}

        def run_backward(loss: Tensor, retain_graph: bool) -> None:
            if backward is not None:
                backward(loss, retain_graph=retain_graph)

        uda = self.method != "source_only"
        # 1. EMA teacher (start of the step, reference position).
        if uda:
            self.update_teacher(step)
        # 2. Augmentation gates, drawn once per iteration (strong, then the weak view's).
        gates = draw_gates(generator, self.blur)
        weak_gates = draw_gates(generator, self.blur)

        # 3-5. Source.
        src = self.source_stage(img, label)
        losses["loss/src_ce"] = src.loss
        stats["stat/src_acc"] = src.accuracy
        if self.method == "dida":
            self.bank_stage(src.output.embedding, label, step)
        run_backward(src.loss, retain_graph=self.feature_distance)

        # 6. ImageNet feature distance.
        if self.feature_distance:
            fd = self.feature_distance_stage(img, label, src.output.features)
            losses["loss/feat_dist"] = fd
            run_backward(fd, retain_graph=False)
        del src

        dbg: dict[str, Tensor] | None = None
        if uda:
            target_img = batch["target_img"]
            if target_img.shape != img.shape:
                raise ValueError(
                    f"step: target_img {tuple(target_img.shape)} and img {tuple(img.shape)} differ")
            # 7-9. Pseudo-labels from the teacher.
            pseudo = self.pseudo_label_stage(target_img, weak_gates, generator)
            stats["stat/pseudo_weight"] = pseudo.confident_fraction
            # 9-10. ClassMix + strong augmentation + student.
            mixed = self.mix_stage(img, label, target_img, pseudo, gates, generator)
            losses["loss/mix_ce"] = mixed.loss
            if self.method == "dida":
                # 11-13. DIDA instance term. It backpropagates through the same student forward as the
                # mix loss, and nothing between the reference's two backward passes reads a gradient:
                # one backward of the sum gives the same gradients (up to float rounding) at the cost
                # of one pass through the student instead of two (the graph was retained anyway).
                inst = self.instance_stage(pseudo, mixed, label.shape[-2:])
                losses["loss/instance"] = inst
                run_backward(mixed.loss + inst, retain_graph=False)
            else:
                run_backward(mixed.loss, retain_graph=False)
            if debug:
                dbg = {
                    "source": img.detach(), "source_label": label.detach(),
                    "target": pseudo.view.detach(), "pseudo_label": pseudo.labels,
                    "pseudo_weight": pseudo.weight, "mix_mask": mixed.mask.float(),
                    "mixed": mixed.image.detach(), "mixed_label": mixed.labels,
                }
        elif debug:
            dbg = {"source": img.detach(), "source_label": label.detach()}

        if backward is not None:
            losses = {k: v.detach() for k, v in losses.items()}
        return StepOutput(losses=losses, stats={k: v.detach() for k, v in stats.items()}, debug=dbg)


_AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_step(cfg: UDACfg, *, student: nn.Module, teacher: EMATeacher | None, imnet_model: nn.Module | None,
               bank: InstanceBank | None, num_classes: int, amp: str = "off",
               device_type: str | None = None) -> SelfTrainingStep:
    """Translate ``dida.config.UDACfg`` into a ``SelfTrainingStep``.

    Args:
        amp: "off" (default: forwards inherit the caller's autocast context), "bf16" or "fp16" to
            make the step open its own autocast context on ``device_type`` (default: the student's device).
    """
    if amp not in _AMP_DTYPES:
        raise ValueError(f"build_step: amp must be one of {sorted(_AMP_DTYPES)}, got {amp!r}")
    dtype = _AMP_DTYPES[amp]
    if dtype is not None and device_type is None:
        device_type = next(student.parameters()).device.type
    fd, aug, bk, dl = cfg.feature_distance, cfg.augment, cfg.bank, cfg.dual_level
    return SelfTrainingStep(
        student=student, teacher=teacher, imnet_model=imnet_model, bank=bank, method=cfg.method,
        num_classes=num_classes, pseudo_threshold=cfg.pseudo_threshold,
        pseudo_weight_ignore_top=cfg.pseudo_weight_ignore_top,
        pseudo_weight_ignore_bottom=cfg.pseudo_weight_ignore_bottom, mix_classes=cfg.mix_classes,
        feature_distance=fd.enabled, feature_distance_weight=fd.weight, feature_distance_classes=fd.classes,
        feature_distance_min_ratio=fd.scale_min_ratio, feature_distance_empty=fd.empty_mask,
        color_jitter_strength=aug.color_jitter_strength, color_jitter_prob=aug.color_jitter_prob,
        blur=aug.blur,
        bank_update_interval=bk.update_interval, bank_momentum=bk.momentum, bank_class_mean=bk.class_mean,
        bank_absent=bk.absent_classes, instance_weight=dl.instance_weight, calibrate=dl.calibrate,
        a_smooth=dl.a_smooth, weak_augment=dl.weak_augment, chunk_rows=dl.chunk_rows,
        autocast_device_type=device_type, autocast_dtype=dtype,
    )

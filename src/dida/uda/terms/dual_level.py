"""DIDA's dual-level interaction as a training term (spec 6; ``uda.dual_level`` and ``uda.bank``).

- Source (every ``bank.update_interval`` steps, step 0 included): the instance bank moves towards the
  class means of the student's source embedding under the source labels.
- Teacher (options): the intended weak view of the target (``weak_augment``; the reference's is a no-op)
  and the "scatter" refinement of the teacher's probabilities (``a_smooth < 1``; the reference uses 1).
- Mixed: the calibrated instance loss between the teacher's similarity to the bank on the target and the
  student's on the mixed image (``loss/instance``), backpropagated with the mixed loss.

The terms work on the embeddings' own resolution (1/4 for DAFormer; 1/8 for HRDA, whose embedding is the
context branch's and whose fused logits, used by the calibration, are at 1/4: each map is upsampled on its
own) and chunks of output rows (``chunk_rows``), so no ``[B, K, H, W]`` tensor is built; the values equal the
reference's full-resolution computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from dida.models.base import SegmentorOutput
from dida.uda.augment import draw_gates, weak_augment
from dida.uda.dual_level import instance_term, semantic_term
from dida.uda.instance_bank import InstanceBank
from dida.uda.terms.base import StepContext, Term, TermBuildContext

if TYPE_CHECKING:
    from dida.config import Config

__all__ = ["DualLevelTerm", "build", "build_bank"]


class DualLevelTerm(Term):
    """The instance bank, its update, and the instance loss (see the module docstring).

    Args:
        bank: the instance bank (a submodule: saved in checkpoints, moved with ``.to()``).
        update_interval, momentum: bank EMA every this many steps with this momentum.
        class_mean, absent: the bank update's reference quirks and their alternatives
            (``InstanceBank.update``).
        instance_weight: weight of the instance loss.
        calibrate: use the calibrated ("gather") target.
        a_smooth: < 1 enables the scatter refinement of the teacher's probabilities.
        weak_augment: apply the weak view to the target before the teacher.
        chunk_rows: rows per chunk of the memory-bounded terms (0: direct computation).
        color_jitter_strength, color_jitter_prob, blur: the weak view's augmentation settings.
        mean, std: the image normalisation (0..255 scale).
    """

    needs_teacher = True

    def __init__(self, bank: InstanceBank, *, update_interval: int, momentum: float,
                 class_mean: Literal["reference", "per_image"], absent: Literal["decay", "skip"],
                 instance_weight: float, calibrate: bool, a_smooth: float, weak_augment: bool, chunk_rows: int,
                 color_jitter_strength: float, color_jitter_prob: float, blur: bool,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if update_interval < 1:
            raise ValueError(f"DualLevelTerm: update_interval must be >= 1, got {update_interval}")
        self.bank = bank
        self.update_interval = int(update_interval)
        self.momentum = float(momentum)
        self.class_mean: Literal["reference", "per_image"] = class_mean
        self.absent: Literal["decay", "skip"] = absent
        self.instance_weight = float(instance_weight)
        self.calibrate = bool(calibrate)
        self.a_smooth = float(a_smooth)
        self.weak_augment = bool(weak_augment)
        self.chunk_rows = int(chunk_rows)
        self.color_jitter_strength = float(color_jitter_strength)
        self.color_jitter_prob = float(color_jitter_prob)
        self.blur = bool(blur)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def on_source(self, ctx: StepContext) -> dict[str, Tensor]:
        """Bank EMA towards the source class means every ``update_interval`` steps (step 0 included)."""
        if ctx.step % self.update_interval == 0:
            assert ctx.source_output is not None and ctx.source_output.embedding is not None
            embedding = ctx.source_output.embedding
            with torch.no_grad(), torch.autocast(device_type=embedding.device.type, enabled=False):
                self.bank.update(embedding.detach().float(), ctx.source_label, self.momentum,
                                 class_mean=self.class_mean, absent=self.absent)
        return {}

    def teacher_input(self, ctx: StepContext, img: Tensor) -> Tensor:
        if not self.weak_augment:
            return img
        gates = draw_gates(ctx.generator, self.blur)
        return weak_augment(img, gates, ctx.generator, self.color_jitter_strength, self.color_jitter_prob,
                            self.mean, self.std)

    def refine_probs(self, ctx: StepContext, probs: Tensor, teacher_output: SegmentorOutput) -> Tensor:
        if self.a_smooth >= 1:
            return probs
        assert teacher_output.embedding is not None
        return semantic_term(self.bank, probs, teacher_output.embedding, self.a_smooth, self.chunk_rows)

    def on_mixed(self, ctx: StepContext) -> dict[str, Tensor]:
        """The instance loss on the student's mixed forward (its graph is shared with the mixed loss)."""
        assert ctx.pseudo is not None and ctx.mixed is not None and ctx.mixed.output is not None
        teacher_embedding = ctx.pseudo.teacher_output.embedding
        student = ctx.mixed.output
        assert teacher_embedding is not None and student.embedding is not None
        loss = instance_term(self.bank, teacher_embedding.detach(), student.embedding, student.logits.detach(),
                             out_size=tuple(ctx.source_label.shape[-2:]), weight=self.instance_weight,
                             calibrate=self.calibrate, chunk_rows=self.chunk_rows)
        return {"loss/instance": loss}


def build_bank(cfg: Config, *, embed_dim: int) -> InstanceBank:
    """The instance bank ``uda.bank`` describes: the reference's npz files, or random unit vectors."""
    from dida.errors import ConfigError

    b = cfg.uda.bank
    if b.init == "random":
        gen = torch.Generator().manual_seed(cfg.run.seed)
        return InstanceBank.random(b.size, embed_dim, cfg.model.num_classes, generator=gen)
    if not b.features_path or not b.labels_path:
        raise ConfigError(
            "uda.bank.features_path / uda.bank.labels_path: DIDA needs an instance bank. Point them at the "
            "reference's f_buffer_s.npz / l_buffer_s.npz (the DIDA repository's embedding_cache/), build one "
            "with `dida bank build CHECKPOINT --data ROOT --out DIR`, or set uda.bank.init=random."
        )
    bank = InstanceBank.from_npz(b.features_path, b.labels_path, cfg.model.num_classes)
    if bank.dim != embed_dim:
        raise ConfigError(
            f"{b.features_path}: the bank holds {bank.dim}-dimensional features but the model's embedding "
            f"has {embed_dim} channels (model.decoder_channels). Use a bank built for this model."
        )
    return bank


def build(cfg: Config, ctx: TermBuildContext) -> DualLevelTerm:
    """The term from ``uda.dual_level``, ``uda.bank`` and ``uda.augment`` (the weak view's settings)."""
    from dida.constants import IMG_MEAN, IMG_STD
    from dida.errors import ConfigError

    embed_dim = ctx.student.embed_dim
    if embed_dim is None:
        raise ConfigError(
            f"uda.dual_level.enabled: the {cfg.model.segmentor} segmentor returns no embedding, which DIDA's "
            "instance bank needs.")
    dl, b, aug = cfg.uda.dual_level, cfg.uda.bank, cfg.uda.augment
    return DualLevelTerm(
        build_bank(cfg, embed_dim=embed_dim), update_interval=b.update_interval, momentum=b.momentum,
        class_mean=b.class_mean, absent=b.absent_classes, instance_weight=dl.instance_weight,
        calibrate=dl.calibrate, a_smooth=dl.a_smooth, weak_augment=dl.weak_augment, chunk_rows=dl.chunk_rows,
        color_jitter_strength=aug.color_jitter_strength, color_jitter_prob=aug.color_jitter_prob,
        blur=aug.blur, mean=IMG_MEAN, std=IMG_STD)

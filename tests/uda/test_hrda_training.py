"""HRDA inside the self-training step (hrda_mic.md 3) and DIDA's terms on HRDA (the instance term with
logits on their own grid is tested in test_dual_level.py).

- one DAFormer + MIC + DIDA step on the tiny HRDA model, checked against spec 3.2-3.7: the teacher predicts
  on the whole target crop (context of the whole crop, sliding detail windows, BatchNorm in train mode,
  dropout off), ClassMix and augmentation at full resolution, the feature distance at the context scale, a
  new detail box per student forward, MIC's forward on top, the validity mask in the pseudo-weight;
- bf16 autocast with activation checkpointing of the backbone.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dida.config import load_config
from dida.models import build_model
from dida.uda.ema import EMATeacher
from dida.uda.step import build_step
from dida.uda.terms import TermBuildContext, build_terms

CROP, DETAIL = 64, 48


pytestmark = pytest.mark.usefixtures("one_thread")


# -------------------------------------------------------------------------------- the HRDA step


TINY = ["model.backbone=mit_b0", "model.pretrained=null", "model.embed_dims=[8,16,32,64]",
        "model.num_heads=[1,1,1,1]", "model.depths=[1,1,1,1]", "model.decoder_channels=16", "model.num_classes=4",
        f"model.hrda.detail_crop_size=[{DETAIL},{DETAIL}]", "model.hrda.attention_embed_dim=12",
        f"data.source.crop_size=[{CROP},{CROP}]", f"data.target.crop_size=[{CROP},{CROP}]",
        "uda.feature_distance.classes=[1,2,3]", "uda.mic.block_size=8", "uda.bank.init=random", "uda.bank.size=8",
        "uda.dual_level.chunk_rows=16", "uda.pseudo_threshold=0.0"]


class _Recorder:
    """Forward-pre-hook that records the input shapes (and the module's mode) of every call."""

    def __init__(self, module: nn.Module) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.training: list[bool] = []
        module.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        self.shapes.append(tuple(args[0].shape))
        self.training.append(module.training)


def test_dida_mic_hrda_step_follows_the_reference_order_and_scales():
    cfg = load_config("gta2cs_dida_mic_hrda", TINY)
    student = build_model(cfg.model, generator=torch.Generator().manual_seed(0)).train()
    e = cfg.uda.ema
    teacher = EMATeacher(student, alpha=e.alpha, update_buffers=e.update_buffers, bn_eval=e.teacher_bn_eval)
    terms = build_terms(cfg, TermBuildContext(student=student, device=torch.device("cpu"), seed=0))
    assert list(terms) == ["feature_distance", "dual_level", "mic"]
    step = build_step(cfg.uda, student=student, teacher=teacher, terms=terms)

    student_in, student_bb = _Recorder(student), _Recorder(student.backbone)
    teacher_bb, imnet_bb = _Recorder(teacher.model.backbone), _Recorder(terms["feature_distance"].imnet_model.backbone)
    teacher_bn = next(m for m in teacher.model.decode_head.modules() if isinstance(m, nn.BatchNorm2d))
    teacher_dropout = next(m for m in teacher.model.decode_head.modules() if isinstance(m, nn.Dropout2d))
    bn_modes = _Recorder(teacher_bn)
    outputs = []
    student.register_forward_hook(lambda m, a, out: outputs.append(out))

    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (2, 4, 4), generator=g).repeat_interleave(16, 1).repeat_interleave(16, 2)
    valid = torch.ones(2, CROP, CROP, dtype=torch.uint8)
    valid[:, :4], valid[:, -10:] = 0, 0
    batch = {"img": torch.randn(2, 3, CROP, CROP, generator=g), "label": label,
             "target_img": torch.randn(2, 3, CROP, CROP, generator=g), "valid_pseudo_mask": valid}
    gen = torch.Generator().manual_seed(1)
    for it in range(2):
        torch.manual_seed(it)
        out = step(batch, it, generator=gen, backward=lambda loss: loss.backward(), debug=True)
        for key in ("loss/src_ce", "loss/feat_dist", "loss/mix_ce", "loss/instance", "loss/mic"):
            assert torch.isfinite(out.losses[key]), (it, key)
        assert out.losses["loss/mic"] > 0 and out.losses["loss/instance"] > 0
        # pseudo-labels and weights at the crop size, zero outside the validity mask (threshold 0: weight 1)
        assert out.debug["pseudo_label"].shape == (2, CROP, CROP)
        assert torch.equal(out.debug["pseudo_weight"], valid.float())
        assert out.debug["mixed"].shape == (2, 3, CROP, CROP) and out.debug["mic_masked"].shape == (2, 3, CROP, CROP)
        student.zero_grad(set_to_none=True)

    half = CROP // 2
    # student: three training forwards per step (source, mixed, masked), each on the full-resolution crop
    assert student_in.shapes == [(2, 3, CROP, CROP)] * 6
    # ... each a context pass of the whole crop at x0.5 and a pass on its own detail crop
    assert student_bb.shapes == [(2, 3, half, half), (2, 3, DETAIL, DETAIL)] * 6
    boxes = [o.detail_box for o in outputs]
    assert all(b is not None for b in boxes) and len(set(boxes)) > 1  # a new box per forward
    # DIDA's grids: context embedding at H/8, fused logits at H/4
    assert all(o.embedding.shape[-2:] == (CROP // 8, CROP // 8) for o in outputs)
    assert all(o.logits.shape[-2:] == (CROP // 4, CROP // 4) for o in outputs)
    # teacher: predict on the whole un-augmented target crop: context of the whole crop, then the detail
    # windows (stride DETAIL/2) batched window-major; train-mode BatchNorm, dropout off (spec 3.3, Q21)
    windows = ((CROP - DETAIL + DETAIL // 2 - 1) // (DETAIL // 2) + 1) ** 2
    assert teacher_bb.shapes == [(2, 3, half, half), (2 * windows, 3, DETAIL, DETAIL)] * 2
    assert all(bn_modes.training) and bn_modes.shapes and not teacher_dropout.training
    # the frozen ImageNet model: features of the source at the context scale (spec 3.7)
    assert imnet_bb.shapes == [(2, 3, half, half)] * 2
    assert all(p.grad is None for p in teacher.parameters())


def test_bf16_autocast_with_activation_checkpointing():
    """Checkpointing recomputes the backbone under the same autocast state and RNG: same loss and gradients."""
    cfg = load_config("gta2cs_hrda", TINY)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, CROP, CROP, generator=g)
    label = torch.randint(0, 4, (2, CROP, CROP), generator=g)
    grads, losses = [], []
    for flag in (False, True):
        cfg.model.hrda.checkpoint_backbone = flag
        model = build_model(cfg.model, generator=torch.Generator().manual_seed(1)).train()
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(img, detail_box=(8, 8))
        assert out.features[-1].dtype == torch.bfloat16
        loss = model.loss(out, label)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name

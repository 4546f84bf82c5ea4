"""The self-training step: the skeleton, its terms (feature distance, DIDA), and what each stage reads."""

from __future__ import annotations

import copy

import pytest
import torch

from dida.config import Config, load_config
from dida.models import build_model
from dida.uda.ema import EMATeacher
from dida.uda.step import SelfTrainingStep, StepOutput, build_step
from dida.uda.terms import TermBuildContext, build_terms

SIZE = 64

# Old step keyword -> config key (the step is built from the configuration, the one home of defaults).
_KEYS = {
    "pseudo_weight_ignore_top": "uda.pseudo_weight_ignore_top",
    "pseudo_weight_ignore_bottom": "uda.pseudo_weight_ignore_bottom",
    "color_jitter_prob": "uda.augment.color_jitter_prob",
    "mix_classes": "uda.mix_classes",
    "feature_distance_empty": "uda.feature_distance.empty_mask",
    "bank_update_interval": "uda.bank.update_interval",
    "chunk_rows": "uda.dual_level.chunk_rows",
    "weak_augment": "uda.dual_level.weak_augment",
    "a_smooth": "uda.dual_level.a_smooth",
    "calibrate": "uda.dual_level.calibrate",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(seed=0, b=2, num_classes=4):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, num_classes, (b, SIZE // 16, SIZE // 16), generator=g)
    label = label.repeat_interleave(16, 1).repeat_interleave(16, 2)  # blocky labels: thing cells exist
    label[:, :, :3] = 255
    label[0, :32, 32:] = 1  # one pure thing cell (class 1) for the feature distance
    return {
        "img": torch.randn(b, 3, SIZE, SIZE, generator=g),
        "label": label,
        "target_img": torch.randn(b, 3, SIZE, SIZE, generator=g),
    }


def _cfg(tiny_model_kwargs, method="dida", **kw) -> Config:
    m = tiny_model_kwargs
    overrides = [
        f"model.backbone={m['backbone']}", f"model.num_classes={m['num_classes']}",
        f"model.embed_dims={m['embed_dims']}", f"model.num_heads={m['num_heads']}", f"model.depths={m['depths']}",
        f"model.decoder_channels={m['decoder_channels']}",
        f"uda.self_training={method != 'source_only'}", f"uda.feature_distance.enabled={method != 'source_only'}",
        f"uda.dual_level.enabled={method == 'dida'}",
        "uda.pseudo_weight_ignore_top=2", "uda.pseudo_weight_ignore_bottom=4", "uda.feature_distance.classes=[1,2]",
        "uda.augment.color_jitter_prob=0.0", "uda.bank.init=random", "uda.bank.size=8", "uda.bank.update_interval=1",
        "uda.dual_level.chunk_rows=16",
    ]
    overrides += [f"{_KEYS[k]}={v}" for k, v in kw.items()]
    return load_config(None, overrides)


def _setup(tiny_model_kwargs, method="dida", amp="off", device_type=None, **kw) -> SelfTrainingStep:
    cfg = _cfg(tiny_model_kwargs, method, **kw)
    student = build_model(cfg.model, generator=torch.Generator().manual_seed(0))
    student.train()
    teacher = EMATeacher(student) if cfg.uda.self_training else None
    torch.manual_seed(1)  # the ImageNet model is initialised independently, from the global RNG
    terms = build_terms(cfg, TermBuildContext(student=student, device=torch.device("cpu"), seed=0))
    return build_step(cfg.uda, student=student, teacher=teacher, terms=terms, amp=amp, device_type=device_type)


def _term(step, name):
    return next(t for t in step.terms if t.name == name)


def _backward(loss):
    loss.backward()


def _run(step, batch, it=0, seed=0, backward=_backward, debug=False) -> StepOutput:
    torch.manual_seed(123)  # dropout / drop-path draw from the global RNG, as in the reference
    return step(batch, it, generator=torch.Generator().manual_seed(seed), backward=backward, debug=debug)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_daformer_step_losses_and_no_mutation(tiny_model_kwargs):
    step = _setup(tiny_model_kwargs, method="daformer")
    batch = _batch()
    clones = {k: v.clone() for k, v in batch.items()}
    out = _run(step, batch, debug=True)
    assert set(out.losses) == {"loss/src_ce", "loss/feat_dist", "loss/mix_ce"}
    assert set(out.stats) == {"stat/src_acc", "stat/pseudo_weight"}
    for v in [*out.losses.values(), *out.stats.values()]:
        assert v.dim() == 0 and torch.isfinite(v) and not v.requires_grad
    assert out.losses["loss/feat_dist"] > 0  # a thing cell is present; the ImageNet model differs
    for k in batch:
        assert torch.equal(batch[k], clones[k]), k
    assert out.debug is not None
    for v in out.debug.values():
        assert v.shape[0] == 2 and not v.requires_grad
    assert out.debug["mixed"].shape == batch["img"].shape
    # the teacher and the frozen ImageNet model receive no gradient
    assert all(p.grad is None and not p.requires_grad for p in step.teacher.model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in _term(step, "feature_distance").parameters())
    # the student does
    assert len(_grads(step.student)) > 0


def test_dida_step_losses_no_mutation_teacher_frozen(tiny_model_kwargs):
    step = _setup(tiny_model_kwargs, method="dida", color_jitter_prob=0.0)
    batch = _batch(1)
    clones = {k: v.clone() for k, v in batch.items()}
    bank = _term(step, "dual_level").bank
    bank_before = bank.features.clone()
    out = _run(step, batch)
    assert set(out.losses) == {"loss/src_ce", "loss/feat_dist", "loss/mix_ce", "loss/instance"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    for k in batch:
        assert torch.equal(batch[k], clones[k]), k
    assert all(p.grad is None for p in step.teacher.model.parameters())
    assert not torch.equal(bank.features, bank_before)  # updated at step 0 (interval 1)


def test_source_only(tiny_model_kwargs):
    step = _setup(tiny_model_kwargs, method="source_only")
    assert step.teacher is None and step.terms == []
    batch = _batch()
    del batch["target_img"]
    out = _run(step, batch)
    assert set(out.losses) == {"loss/src_ce"}
    assert set(out.stats) == {"stat/src_acc"}


def test_same_generator_same_outputs(tiny_model_kwargs):
    base = _setup(tiny_model_kwargs, method="dida", weak_augment=True, color_jitter_prob=0.0)
    outs, grads = [], []
    for _ in range(2):
        step = copy.deepcopy(base)
        out = _run(step, _batch(2), seed=7, debug=True)
        outs.append(out)
        grads.append(_grads(step.student))
    for k in outs[0].losses:
        assert torch.equal(outs[0].losses[k], outs[1].losses[k]), k
    for k in outs[0].debug:
        assert torch.equal(outs[0].debug[k], outs[1].debug[k]), k
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k
    # another generator seed changes the draws (mix masks)
    other = _run(copy.deepcopy(base), _batch(2), seed=8, debug=True)
    assert not torch.equal(other.debug["mix_mask"], outs[0].debug["mix_mask"])


@pytest.mark.parametrize("method", ["daformer", "dida"])
def test_per_stage_backward_equals_summed_backward(tiny_model_kwargs, method):
    base = _setup(tiny_model_kwargs, method=method, color_jitter_prob=0.0)
    batch = _batch(3)
    a = copy.deepcopy(base)
    out_a = _run(a, batch, backward=_backward)
    b = copy.deepcopy(base)
    out_b = _run(b, batch, backward=None)
    assert all(v.requires_grad for v in out_b.losses.values())
    sum(out_b.losses.values()).backward()
    for k in out_a.losses:
        torch.testing.assert_close(out_a.losses[k], out_b.losses[k].detach())
    ga, gb = _grads(a.student), _grads(b.student)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6)


def test_ema_timeline(tiny_model_kwargs):
    step = _setup(tiny_model_kwargs, method="daformer")
    # perturb the teacher, step 0 must re-initialise it from the student
    with torch.no_grad():
        for p in step.teacher.model.parameters():
            p.add_(1.0)
    _run(step, _batch(), it=0)
    s_params = [p.detach().clone() for p in step.student.parameters()]
    # (the optimizer would move the student here; emulate with a shift)
    t_before = [p.clone() for p in step.teacher.model.parameters()]
    with torch.no_grad():
        for p in step.student.parameters():
            p.add_(0.5)
    _run(step, _batch(), it=1)
    for t, tb, s in zip(step.teacher.model.parameters(), t_before, s_params):
        torch.testing.assert_close(t, 0.5 * tb + 0.5 * (s + 0.5))
    for tb, s in zip(t_before, s_params):
        torch.testing.assert_close(tb, s)


def test_scatter_and_weak_options_run(tiny_model_kwargs):
    step = _setup(tiny_model_kwargs, method="dida", a_smooth=0.5, weak_augment=True, color_jitter_prob=0.0,
                  mix_classes="per_image", feature_distance_empty="nan", calibrate=False)
    batch = _batch(4)
    clones = {k: v.clone() for k, v in batch.items()}
    out = _run(step, batch, debug=True)
    assert torch.isfinite(out.losses["loss/instance"]) and torch.isfinite(out.losses["loss/mix_ce"])
    for k in batch:
        assert torch.equal(batch[k], clones[k]), k


def test_build_step_from_config(tiny_model_kwargs):
    cfg = _cfg(tiny_model_kwargs, "dida")
    cfg.uda.bank.update_interval = 50
    student = build_model(cfg.model, generator=torch.Generator().manual_seed(0))
    terms = build_terms(cfg, TermBuildContext(student=student, device=torch.device("cpu"), seed=0))
    step = build_step(cfg.uda, student=student, teacher=EMATeacher(student, alpha=cfg.uda.ema.alpha), terms=terms)
    assert [t.name for t in step.terms] == ["feature_distance", "dual_level"]
    assert _term(step, "dual_level").update_interval == 50 and step.pseudo_threshold == 0.968
    assert _term(step, "feature_distance").classes == (1, 2) and step.autocast_dtype is None
    # a term that needs the teacher's pseudo-labels cannot run without a teacher
    with pytest.raises(ValueError, match="need an EMA teacher"):
        build_step(cfg.uda, student=student, teacher=None, terms=terms)


def test_missing_pieces_rejected(tiny_model_kwargs):
    from dida.errors import ConfigError

    cfg = _cfg(tiny_model_kwargs, "dida")
    cfg.uda.self_training = False
    student = build_model(cfg.model, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="uda.dual_level.enabled.*self_training"):
        build_terms(cfg, TermBuildContext(student=student, device=torch.device("cpu"), seed=0))
    cfg.uda.self_training = True
    cfg.uda.bank.init = "from_file"
    with pytest.raises(ConfigError, match="uda.bank.features_path"):
        build_terms(cfg, TermBuildContext(student=student, device=torch.device("cpu"), seed=0))


# ----------------------------------------------------------------------------- what each stage reads


def test_feature_distance_compares_the_last_backbone_stage(tiny_model_kwargs, monkeypatch):
    from dida.uda.terms import feature_distance as fd_mod

    step = _setup(tiny_model_kwargs, method="daformer")
    seen = {}
    original = fd_mod.feature_distance_loss

    def spy(student_feat, imnet_feat, mask, weight, empty):
        seen.update(student=student_feat.detach().clone(), imnet=imnet_feat.detach().clone(), mask=mask)
        return original(student_feat, imnet_feat, mask, weight, empty)

    monkeypatch.setattr(fd_mod, "feature_distance_loss", spy)
    batch = _batch(5)
    _run(step, batch)
    torch.manual_seed(123)  # the same drop-path draws as the step's source forward
    student_feats = copy.deepcopy(step.student).train()(batch["img"]).features
    imnet = _term(step, "feature_distance").imnet_model
    with torch.no_grad():
        imnet_feats = imnet.extract_features(batch["img"])
    assert len(student_feats) == 4
    torch.testing.assert_close(seen["student"], student_feats[-1].detach())
    torch.testing.assert_close(seen["imnet"], imnet_feats[-1])
    assert seen["mask"].shape == student_feats[-1].shape[:1] + student_feats[-1].shape[-2:]
    assert not imnet.training  # the ImageNet model runs in eval mode (no dropout / drop-path)


@pytest.mark.parametrize("weak", [False, True])
def test_teacher_sees_the_unaugmented_target_unless_the_weak_view_is_on(tiny_model_kwargs, monkeypatch, weak):
    step = _setup(tiny_model_kwargs, method="dida", weak_augment=weak, color_jitter_prob=0.0)
    seen = []
    original = EMATeacher.predict

    def spy(self, images):
        seen.append(images.clone())
        return original(self, images)

    monkeypatch.setattr(EMATeacher, "predict", spy)
    batch = _batch(6)
    _run(step, batch, seed=3)
    assert len(seen) == 1
    assert torch.equal(seen[0], batch["target_img"]) is (not weak)


def test_bank_update_reads_the_source_embedding_and_labels(tiny_model_kwargs, monkeypatch):
    from dida.uda.instance_bank import InstanceBank

    step = _setup(tiny_model_kwargs, method="dida")
    seen = {}
    original = InstanceBank.update

    def spy(self, embedding, labels, momentum, **kw):
        seen.update(embedding=embedding.clone(), labels=labels.clone(), momentum=momentum, **kw)
        return original(self, embedding, labels, momentum, **kw)

    monkeypatch.setattr(InstanceBank, "update", spy)
    student_before = copy.deepcopy(step.student)
    batch = _batch(7)
    _run(step, batch)
    torch.manual_seed(123)
    source_embedding = student_before(batch["img"]).embedding
    torch.testing.assert_close(seen["embedding"], source_embedding.detach())
    assert torch.equal(seen["labels"], batch["label"])
    assert seen["momentum"] == 0.999 and seen["class_mean"] == "reference" and seen["absent"] == "decay"


def test_bank_update_runs_on_its_interval_only(tiny_model_kwargs):
    step = _setup(tiny_model_kwargs, method="dida", bank_update_interval=3)
    bank = _term(step, "dual_level").bank
    changed = []
    for it in range(4):
        before = bank.features.clone()
        _run(step, _batch(it), it=it)
        changed.append(not torch.equal(before, bank.features))
    assert changed == [True, False, False, True]


def test_empty_feature_distance_mask_nan_logs_nan_and_adds_no_gradient(tiny_model_kwargs):
    """Reference: FD over an empty thing mask is NaN; it is logged and the other gradients still apply."""
    batch = _batch(8)
    batch["label"] = torch.where(batch["label"] == 255, 255, 0)  # no thing class anywhere
    with_fd = _setup(tiny_model_kwargs, method="daformer", feature_distance_empty="nan")
    out = _run(with_fd, batch)
    assert torch.isnan(out.losses["loss/feat_dist"])
    grads = _grads(with_fd.student)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    zero = _setup(tiny_model_kwargs, method="daformer", feature_distance_empty="zero")
    out_zero = _run(zero, batch)
    assert out_zero.losses["loss/feat_dist"] == 0
    for k, g in _grads(zero.student).items():
        torch.testing.assert_close(grads[k], g)


def test_valid_pseudo_mask_zeroes_the_target_weight(tiny_model_kwargs):
    step = _setup(tiny_model_kwargs, method="daformer", pseudo_weight_ignore_top=0, pseudo_weight_ignore_bottom=0)
    batch = _batch(9)
    valid = torch.ones(2, 1, SIZE, SIZE, dtype=torch.uint8)
    valid[:, :, :, :10] = 0
    batch["valid_pseudo_mask"] = valid
    out = _run(step, batch, debug=True)
    weight = out.debug["pseudo_weight"]
    assert torch.all(weight[:, :, :10] == 0)
    assert torch.all(weight[:, :, 10:] == weight[0, 0, 10])


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["daformer", "dida"])
def test_cuda_bf16_step_has_no_host_sync(tiny_model_kwargs, method):
    dev = torch.device("cuda")
    step = _setup(tiny_model_kwargs, method=method, amp="bf16", device_type="cuda", color_jitter_prob=0.0,
                  weak_augment=True)
    step.student.to(dev)
    step.teacher.to(dev)
    for term in step.terms:
        term.to(dev)
    batch = {k: v.to(dev) for k, v in _batch(5).items()}
    clones = {k: v.clone() for k, v in batch.items()}
    _run(step, batch, it=0)  # warm-up (lazy initialisations may synchronise once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _run(step, batch, it=1, debug=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(bool(torch.isfinite(v)) for v in out.losses.values())
    assert all(v.device.type == "cuda" for v in out.losses.values())
    for k in batch:
        assert torch.equal(batch[k], clones[k]), k

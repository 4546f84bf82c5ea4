from __future__ import annotations

import copy

import pytest
import torch

from dida.config import UDACfg
from dida.models import build_segmentor
from dida.uda.ema import EMATeacher
from dida.uda.instance_bank import InstanceBank
from dida.uda.step import SelfTrainingStep, StepOutput, build_step

SIZE = 64


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: thread start-up dominates and oversubscribes shared CI cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def _setup(tiny_model_kwargs, method="dida", **kw):
    student = build_segmentor(**tiny_model_kwargs, generator=torch.Generator().manual_seed(0))
    student.train()
    teacher = EMATeacher(student) if method != "source_only" else None
    imnet = copy.deepcopy(student.backbone).eval().requires_grad_(False) if method != "source_only" else None
    bank = None
    if method == "dida":
        bank = InstanceBank.random(8, student.embed_dim, 4, generator=torch.Generator().manual_seed(1))
    args = dict(student=student, teacher=teacher, imnet_model=imnet, bank=bank, method=method, num_classes=4,
                pseudo_weight_ignore_top=2, pseudo_weight_ignore_bottom=4, feature_distance_classes=(1, 2),
                color_jitter_prob=0.0, bank_update_interval=1, chunk_rows=16)
    args.update(kw)
    return SelfTrainingStep(**args)


def _backward(loss, retain_graph=False):
    loss.backward(retain_graph=retain_graph)


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
    assert out.losses["loss/feat_dist"] > 0  # a thing cell is present; drop-path makes the features differ
    for k in batch:
        assert torch.equal(batch[k], clones[k]), k
    assert out.debug is not None
    for v in out.debug.values():
        assert v.shape[0] == 2 and not v.requires_grad
    assert out.debug["mixed"].shape == batch["img"].shape
    # the teacher receives no gradient
    assert all(p.grad is None and not p.requires_grad for p in step.teacher.model.parameters())
    # the student does
    assert len(_grads(step.student)) > 0


def test_dida_step_losses_no_mutation_teacher_frozen(tiny_model_kwargs):
    step = _setup(tiny_model_kwargs, method="dida", color_jitter_prob=0.0)
    batch = _batch(1)
    clones = {k: v.clone() for k, v in batch.items()}
    bank_before = step.bank.features.clone()
    out = _run(step, batch)
    assert set(out.losses) == {"loss/src_ce", "loss/feat_dist", "loss/mix_ce", "loss/instance"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    for k in batch:
        assert torch.equal(batch[k], clones[k]), k
    assert all(p.grad is None for p in step.teacher.model.parameters())
    assert not torch.equal(step.bank.features, bank_before)  # updated at step 0 (interval 1)


def test_source_only(tiny_model_kwargs):
    step = _setup(tiny_model_kwargs, method="source_only")
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
    cfg = UDACfg(method="dida")
    cfg.feature_distance.classes = [1, 2]
    student = build_segmentor(**tiny_model_kwargs, generator=torch.Generator().manual_seed(0))
    teacher = EMATeacher(student, alpha=cfg.ema.alpha)
    bank = InstanceBank.random(8, student.embed_dim, 4, generator=torch.Generator().manual_seed(1))
    step = build_step(cfg, student=student, teacher=teacher, imnet_model=copy.deepcopy(student.backbone),
                      bank=bank, num_classes=4)
    assert step.method == "dida" and step.bank_update_interval == 50 and step.pseudo_threshold == 0.968
    assert step.feature_distance_classes == (1, 2) and step.autocast_dtype is None
    with pytest.raises(ValueError):
        build_step(UDACfg(method="dida"), student=student, teacher=teacher, imnet_model=None, bank=None,
                   num_classes=4)


def test_missing_pieces_rejected(tiny_model_kwargs):
    student = build_segmentor(**tiny_model_kwargs, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        SelfTrainingStep(student=student, teacher=None, imnet_model=None, bank=None, method="daformer",
                         num_classes=4)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["daformer", "dida"])
def test_cuda_bf16_step_has_no_host_sync(tiny_model_kwargs, method):
    dev = torch.device("cuda")
    step = _setup(tiny_model_kwargs, method=method, color_jitter_prob=0.0, weak_augment=True,
                  autocast_device_type="cuda", autocast_dtype=torch.bfloat16)
    for name in ("student", "teacher", "imnet_model", "bank"):
        if getattr(step, name) is not None:
            getattr(step, name).to(dev)
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

"""MIC's masked image consistency term (hrda_mic.md 4.3-4.6; quirks Q12, Q13, Q15) on tiny models."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close

from dida.config import load_config
from dida.constants import IMG_MEAN, IMG_STD
from dida.errors import ConfigError
from dida.models import build_model, build_segmentor
from dida.models.base import BaseSegmentor, SegmentorOutput
from dida.models.losses import seg_ce
from dida.uda import augment
from dida.uda.augment import AugmentGates, color_jitter, draw_gates
from dida.uda.ema import EMATeacher
from dida.uda.masking import block_mask, mask_image
from dida.uda.terms import PseudoLabels, StepContext, TermBuildContext, build_terms
from dida.uda.terms.mic import MaskedConsistencyTerm, build, color_augment

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _term(**kw) -> MaskedConsistencyTerm:
    args = {"mode": "separatetrg", "block_size": 8, "ratio": 0.7, "mask_lambda": 1.0, "lambda_scope": "seg_only",
            "blur_gate": "always", "blur_sigma": "per_batch", "blur": True, "color_jitter_strength": 0.2,
            "color_jitter_prob": 0.2, "mean": IMG_MEAN, "std": IMG_STD, "teacher": None, "pseudo_threshold": None,
            "pseudo_weight_ignore_top": 0, "pseudo_weight_ignore_bottom": 0}
    args.update(kw)
    return MaskedConsistencyTerm(**args)


def _student(tiny_model_kwargs, seed=0, train=False) -> BaseSegmentor:
    model = build_segmentor(**tiny_model_kwargs, generator=torch.Generator().manual_seed(seed))
    return model.train(train)  # eval: no dropout / drop-path, so two forwards agree exactly


def _ctx(student, *, seed=0, batch=2, step=0, teacher=None, pseudo=True, target=True) -> StepContext:
    g = torch.Generator().manual_seed(100 + batch)
    src = torch.randn(batch, 3, SIZE, SIZE, generator=g)
    label = torch.randint(0, 4, (batch, SIZE, SIZE), generator=g)
    label[:, :2] = 255
    tgt = torch.randn(batch, 3, SIZE, SIZE, generator=g)
    plabels = torch.randint(0, 4, (batch, SIZE, SIZE), generator=g)
    pweight = torch.full((batch, SIZE, SIZE), 0.6)
    pweight[:, :3] = 0
    valid = torch.ones(batch, SIZE, SIZE)
    valid[:, :, -5:] = 0
    ps = PseudoLabels(labels=plabels, weight=pweight, confident_fraction=torch.tensor(0.6),
                      probs=torch.full((batch, 4, SIZE, SIZE), 0.25), teacher_output=None, view=tgt)  # type: ignore[arg-type]
    return StepContext(step=step, generator=torch.Generator().manual_seed(seed), student=student, teacher=teacher,
                       batch={"valid_pseudo_mask": valid}, source_img=src, source_label=label,
                       autocast=contextlib.nullcontext, target_img=tgt if target else None,
                       pseudo=ps if pseudo else None, debug={})


class _TwoPartModel(BaseSegmentor):
    """A 1x1-conv segmentor with a second ("detail") loss part, like HRDA's 0.1-weighted detail crop."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.backbone.weight.copy_(torch.linspace(-1, 1, 12).view(4, 3, 1, 1))

    @property
    def num_classes(self) -> int:
        return 4

    def forward(self, img: Tensor) -> SegmentorOutput:
        return SegmentorOutput(features=[], embedding=None, logits=self.backbone(img))

    def loss_terms(self, output, label, weight=None):
        crop = (slice(None), slice(None), slice(0, SIZE // 2), slice(0, SIZE // 2))
        w = None if weight is None else weight[crop[0], crop[2], crop[3]]
        return {"seg": seg_ce(output.logits, label, weight),
                "detail": 0.1 * seg_ce(output.logits[crop], label[crop[0], crop[2], crop[3]], w)}


class _Counter:
    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self)

    def __call__(self, *args) -> None:
        self.calls += 1


# ------------------------------------------------------------------------------------------- loss


def test_loss_is_the_models_loss_on_the_masked_target(tiny_model_kwargs):
    student = _student(tiny_model_kwargs)
    ctx = _ctx(student, seed=3)
    out = _term().own_forward(ctx)
    mask = block_mask(ctx.target_img.shape, 8, 0.7, torch.Generator().manual_seed(3))  # no aug: the first draw
    masked = mask_image(ctx.target_img, mask)
    expected = student.loss(student(masked), ctx.pseudo.labels, ctx.pseudo.weight)
    assert set(out) == {"loss/mic"}
    assert_close(out["loss/mic"], expected, rtol=0, atol=0)
    assert out["loss/mic"].requires_grad and torch.isfinite(out["loss/mic"])
    assert torch.equal(ctx.debug["mic_masked"], masked)
    assert ctx.debug["mic_pred"].shape == (2, SIZE, SIZE) and ctx.debug["mic_pred"].dtype == torch.long
    assert set(ctx.stats) == {"stat/mic_acc"}  # one loss part: no per-part stats


@pytest.mark.parametrize("mask_lambda, scope", [(1.0, "seg_only"), (0.5, "seg_only"), (0.5, "all"), (0.0, "seg_only")])
def test_mask_lambda_scales_only_seg_by_default(mask_lambda, scope):
    model = _TwoPartModel()
    ctx = _ctx(model, seed=1)
    loss = _term(mask_lambda=mask_lambda, lambda_scope=scope).own_forward(ctx)["loss/mic"]
    masked = mask_image(ctx.target_img, block_mask(ctx.target_img.shape, 8, 0.7, torch.Generator().manual_seed(1)))
    parts = model.loss_terms(model(masked), ctx.pseudo.labels, ctx.pseudo.weight)
    if scope == "seg_only":  # Q12: HRDA's detail term keeps its weight
        expected = mask_lambda * parts["seg"] + parts["detail"]
    else:
        expected = mask_lambda * (parts["seg"] + parts["detail"])
    assert_close(loss, expected)
    assert set(ctx.stats) == {"stat/mic_acc", "stat/mic_seg", "stat/mic_detail"}


# ------------------------------------------------------------------------------ forwards and grads


@pytest.mark.parametrize("separate", [False, True])
def test_one_student_forward_gradients_only_into_the_student(tiny_model_kwargs, separate):
    student = _student(tiny_model_kwargs, train=True)
    dacs_teacher = EMATeacher(student)
    mic_teacher = EMATeacher(student, alpha=0.5) if separate else None
    term = _term(mode="separatetrgaug", teacher=mic_teacher, pseudo_threshold=0.0)
    counter = _Counter(student)
    ctx = _ctx(student, teacher=dacs_teacher, seed=2)
    torch.manual_seed(0)
    loss = term.own_forward(ctx)["loss/mic"]
    assert counter.calls == 1
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    teachers = [dacs_teacher] + ([mic_teacher] if separate else [])
    for t in teachers:
        assert all(p.grad is None and not p.requires_grad for p in t.parameters())


def test_inputs_are_not_mutated(tiny_model_kwargs):
    student = _student(tiny_model_kwargs)
    for mode in ("separatetrgaug", "separateaug", "separatesrcaug"):
        ctx = _ctx(student, seed=4)
        before = {k: v.clone() for k, v in [("src", ctx.source_img), ("label", ctx.source_label),
                                            ("tgt", ctx.target_img), ("pl", ctx.pseudo.labels),
                                            ("pw", ctx.pseudo.weight), ("valid", ctx.batch["valid_pseudo_mask"])]}
        _term(mode=mode, color_jitter_prob=0.0).own_forward(ctx)
        after = {"src": ctx.source_img, "label": ctx.source_label, "tgt": ctx.target_img, "pl": ctx.pseudo.labels,
                 "pw": ctx.pseudo.weight, "valid": ctx.batch["valid_pseudo_mask"]}
        for k, v in before.items():
            assert torch.equal(after[k], v), (mode, k)


def test_same_generator_same_result(tiny_model_kwargs):
    student = _student(tiny_model_kwargs)
    term = _term(mode="separatetrgaug", color_jitter_prob=0.0)
    runs = []
    for seed in (5, 5, 6):
        ctx = _ctx(student, seed=seed)
        runs.append((term.own_forward(ctx)["loss/mic"], ctx.debug["mic_masked"]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])


# ------------------------------------------------------------------------------------------- modes


@pytest.mark.parametrize("mode", ["separatetrg", "separatesrc", "separate"])
def test_each_mode_selects_its_images_labels_and_weights(tiny_model_kwargs, mode):
    student = _student(tiny_model_kwargs)
    term = _term(mode=mode)
    src_only = mode == "separatesrc"
    assert term.needs_teacher == (not src_only)
    ctx = _ctx(student, seed=7, pseudo=not src_only, target=not src_only)
    img, label, weight = term.select(ctx)
    if mode == "separatetrg":
        assert img is ctx.target_img and label is ctx.pseudo.labels and weight is ctx.pseudo.weight  # un-mixed
    elif mode == "separatesrc":
        assert img is ctx.source_img and label is ctx.source_label and weight is None
    else:  # Q15: image 0 of each domain
        assert torch.equal(img, torch.stack([ctx.source_img[0], ctx.target_img[0]]))
        assert torch.equal(label, torch.stack([ctx.source_label[0], ctx.pseudo.labels[0]]))
        assert torch.equal(weight, torch.stack([torch.ones(SIZE, SIZE), ctx.pseudo.weight[0]]))
    loss = term.own_forward(ctx)["loss/mic"]
    masked = mask_image(img, block_mask(img.shape, 8, 0.7, torch.Generator().manual_seed(7)))
    assert torch.equal(ctx.debug["mic_masked"], masked)
    assert_close(loss, student.loss(student(masked), label, weight), rtol=0, atol=0)


def test_separate_mode_needs_a_batch_of_two(tiny_model_kwargs):
    student = _student(tiny_model_kwargs)
    with pytest.raises(ValueError, match="Q15"):
        _term(mode="separateaug").own_forward(_ctx(student, batch=3))
    with pytest.raises(ValueError, match="uda.self_training"):
        _term(mode="separatetrg").own_forward(_ctx(student, pseudo=False, target=False))


# ------------------------------------------------------------------------------------ augmentation


def test_jitter_draws_one_op_order_per_call():
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    # One image: the same draws and result as DACS's per-image colour jitter.
    a = color_jitter(x, 0.2, torch.Generator().manual_seed(1), IMG_MEAN, IMG_STD, one_order=True)
    b = augment.color_jitter(x, 0.2, torch.Generator().manual_seed(1), IMG_MEAN, IMG_STD)
    assert torch.equal(a, b)
    # A batch: per-image factors, one order, drawn after the factors.
    xb = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    out = color_jitter(xb, 0.2, torch.Generator().manual_seed(3), IMG_MEAN, IMG_STD, one_order=True)
    g = torch.Generator().manual_seed(3)
    factors = [0.8 + 0.4 * torch.rand(3, generator=g, dtype=torch.float64) for _ in range(3)]
    factors.append(-0.2 + 0.4 * torch.rand(3, generator=g, dtype=torch.float64))
    order = torch.randperm(4, generator=g).tolist()
    ops = [augment.adjust_brightness, augment.adjust_contrast, augment.adjust_saturation, augment.adjust_hue]
    for i in range(3):
        y = augment.denormalize(xb[i:i + 1])
        for k in order:
            y = ops[k](y, factors[k][i:i + 1].float())
        assert_close(out[i:i + 1], augment.renormalize(y), rtol=0, atol=1e-6)


def test_blur_sigma_per_batch_or_per_image():
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)  # 7-px kernel
    gates = AugmentGates(color_jitter=0.0, blur=1.0)  # no jitter, blur
    common = {"strength": 0.2, "prob": 0.2, "mean": IMG_MEAN, "std": IMG_STD}
    batch = color_augment(x, gates, torch.Generator().manual_seed(1), blur_sigma="per_batch", **common)
    image = color_augment(x, gates, torch.Generator().manual_seed(1), blur_sigma="per_image", **common)
    assert torch.equal(batch[0], batch[1])  # Q13: one sigma for both images
    assert not torch.equal(image[0], image[1])
    sigma = 0.15 + torch.rand(1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_close(batch, augment.gaussian_blur(x, sigma.expand(2)))
    none = color_augment(x, AugmentGates(0.0, 0.0), torch.Generator(), blur_sigma="per_batch", **common)
    assert torch.equal(none, x) and none.data_ptr() != x.data_ptr()


def test_blur_gate_ignores_the_blur_flag_by_default():
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    # a seed whose blur gate opens (u_b > 0.5) while the jitter gate stays shut (u_cj <= prob)
    gates = {s: draw_gates(torch.Generator().manual_seed(s)) for s in range(100)}
    seed = next(s for s, g in gates.items() if g.color_jitter <= 0.2 and g.blur > 0.5)
    ctx = _ctx(None, seed=seed)
    results = {}
    for gate in ("always", "follow_blur"):
        ctx.generator = torch.Generator().manual_seed(seed)
        results[gate] = _term(mode="separatetrgaug", blur=False, blur_gate=gate).masked_images(ctx, x)
    for gate, blur in (("always", True), ("follow_blur", False)):
        g = torch.Generator().manual_seed(seed)
        aug = color_augment(x, draw_gates(g, blur=blur), g, strength=0.2, prob=0.2, blur_sigma="per_batch",
                            mean=IMG_MEAN, std=IMG_STD)
        assert torch.equal(results[gate], mask_image(aug, block_mask(x.shape, 8, 0.7, g))), gate
    assert not torch.equal(results["always"], results["follow_blur"])


# ----------------------------------------------------------------------------------- separate teacher


def _cfg(*overrides: str):
    return load_config("tiny_cpu", ["model.embed_dims=[8,16,32,64]", "model.num_heads=[1,1,1,1]",
                                    "model.depths=[1,1,1,1]", "model.decoder_channels=16", "model.num_classes=4",
                                    "uda.feature_distance.classes=[1,2]", "uda.mic.block_size=8",
                                    "uda.pseudo_weight_ignore_top=2", "uda.pseudo_weight_ignore_bottom=3",
                                    *overrides])


def test_separate_teacher_ema_pseudo_labels_and_state_dict(tiny_model_kwargs):
    cfg = _cfg("uda.mic.enabled=true", "uda.mic.alpha=0.3", "uda.mic.confidence_weight=false")
    student = _student(tiny_model_kwargs, train=True)
    term = build(cfg, TermBuildContext(student=student, device=torch.device("cpu"), seed=0))
    assert term.teacher is not None and term.teacher.alpha == 0.3 and term.pseudo_threshold is None
    assert any(k.startswith("teacher.model.") for k in term.state_dict())
    # step 0: the teacher becomes a copy of the student
    ctx = _ctx(student, step=0)
    term.on_step_start(ctx)  # the step calls it right after the DACS teacher's update
    term.own_forward(ctx)
    for t, s in zip(term.teacher.model.parameters(), student.parameters()):
        assert torch.equal(t, s)
    # its pseudo-labels: the teacher's argmax on the raw target; threshold None -> weight 1, margins and the
    # loader's validity mask zeroed
    labels, weight = term.teacher_pseudo_labels(_ctx(student, step=0))
    expected = torch.ones(2, SIZE, SIZE)
    expected[:, :2] = 0
    expected[:, -3:] = 0
    expected[:, :, -5:] = 0
    assert torch.equal(weight, expected)
    logits = term.teacher.predict(ctx.target_img).logits
    assert torch.equal(labels, F.interpolate(logits, size=(SIZE, SIZE), mode="bilinear").argmax(1))
    # step 1: teacher <- a * teacher + (1 - a) * student with a = min(1 - 1/2, 0.3) = 0.3
    old = [p.clone() for p in term.teacher.model.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    ctx1 = _ctx(student, step=1)
    term.on_step_start(ctx1)
    term.own_forward(ctx1)
    for t, o, s in zip(term.teacher.model.parameters(), old, student.parameters()):
        assert_close(t, 0.3 * o + 0.7 * s)
    # checkpoint round trip
    fresh = build(cfg, TermBuildContext(student=_student(tiny_model_kwargs, seed=9), device=torch.device("cpu"),
                                        seed=0))
    fresh.load_state_dict(term.state_dict())
    for a, b in zip(fresh.state_dict().values(), term.state_dict().values()):
        assert torch.equal(a, b)


def test_separate_teacher_threshold_and_same_defaults(tiny_model_kwargs):
    student = _student(tiny_model_kwargs)
    bctx = TermBuildContext(student=student, device=torch.device("cpu"), seed=0)
    same = build(_cfg("uda.mic.enabled=true"), bctx)
    assert same.teacher is None  # 'same'/'same': the DACS teacher's pseudo-labels
    own = build(_cfg("uda.mic.enabled=true", "uda.mic.pseudo_threshold=0.5"), bctx)
    assert own.teacher is not None and own.teacher.alpha == 0.999 and own.pseudo_threshold == 0.5
    _, weight = own.teacher_pseudo_labels(_ctx(student))
    probs = torch.softmax(F.interpolate(own.teacher.predict(_ctx(student).target_img).logits, size=(SIZE, SIZE),
                                        mode="bilinear"), dim=1)
    fraction = (probs.max(1).values >= 0.5).float().mean()
    assert_close(weight[:, 5:10, :10], fraction.expand(2, 5, 10))


# ------------------------------------------------------------------------------------------- config


def test_config_defaults_validation_and_build_errors(tiny_model_kwargs):
    cfg = _cfg()
    assert not cfg.uda.mic.enabled
    mic = _cfg("uda.mic.enabled=true").uda.mic
    assert (mic.mode, mic.ratio, mic.mask_lambda, mic.lambda_scope) == ("separatetrgaug", 0.7, 1.0, "seg_only")
    assert (mic.blur_gate, mic.blur_sigma, mic.alpha, mic.pseudo_threshold) == ("always", "per_batch", None, None)
    for bad, key in [("uda.mic.ratio=1.5", "uda.mic.ratio"), ("uda.mic.block_size=0", "uda.mic.block_size"),
                     ("uda.mic.mask_lambda=-1", "uda.mic.mask_lambda"), ("uda.mic.alpha=2", "uda.mic.alpha"),
                     ("uda.mic.pseudo_threshold=-0.1", "uda.mic.pseudo_threshold"),
                     ("uda.mic.mode=separatefoo", "uda.mic.mode"), ("uda.mic.alpha=same", "uda.mic.alpha")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            _cfg("uda.mic.enabled=true", bad)
    with pytest.raises(ConfigError, match="uda.mic.block_size"):
        _cfg("uda.mic.enabled=true", "uda.mic.block_size=200")  # 64-px crops: round(64 / 200) = 0
    with pytest.raises(ConfigError, match="uda.self_training"):
        _cfg("uda.mic.enabled=true", "uda.self_training=false")
    # source-only MIC runs without self-training (spec 4.3, last row)
    cfg = _cfg("uda.mic.enabled=true", "uda.self_training=false", "uda.mic.mode=separatesrcaug")
    student = _student(tiny_model_kwargs)
    terms = build_terms(cfg, TermBuildContext(student=student, device=torch.device("cpu"), seed=0))
    assert not terms["mic"].needs_teacher
    with pytest.raises(ConfigError, match="source"):
        build(_cfg("uda.mic.enabled=true", "uda.mic.mode=separatesrc", "uda.mic.alpha=0.5"),
              TermBuildContext(student=student, device=torch.device("cpu"), seed=0))


def test_presets():
    for name, block, dual in [("gta2cs_mic_daformer", 32, False), ("synthia2cs_mic_daformer", 32, False),
                              ("gta2cs_mic_dida", 32, True), ("synth_mic", 8, False), ("synth_mic_dida", 8, True)]:
        cfg = load_config(name)
        m = cfg.uda.mic
        assert m.enabled and m.mode == "separatetrgaug" and m.block_size == block, name
        assert (m.ratio, m.mask_lambda, m.alpha, m.pseudo_threshold) == (0.7, 1.0, None, None), name
        assert cfg.uda.dual_level.enabled == dual and cfg.uda.self_training, name
    assert load_config("synthia2cs_mic_daformer").data.source.kind == "synthia"


# -------------------------------------------------------------------------------------- end to end


def test_step_with_mic_feature_distance_and_dida(tiny_model_kwargs):
    from dida.uda.step import build_step

    cfg = _cfg("uda.mic.enabled=true", "uda.dual_level.enabled=true", "uda.bank.init=random", "uda.bank.size=8",
               "uda.bank.update_interval=1", "uda.dual_level.chunk_rows=16", "uda.augment.color_jitter_prob=0.0")
    student = build_model(cfg.model, generator=torch.Generator().manual_seed(0)).train()
    e = cfg.uda.ema
    teacher = EMATeacher(student, alpha=e.alpha, update_buffers=e.update_buffers, bn_eval=e.teacher_bn_eval)
    terms = build_terms(cfg, TermBuildContext(student=student, device=torch.device("cpu"), seed=0))
    assert list(terms) == ["feature_distance", "dual_level", "mic"]
    step = build_step(cfg.uda, student=student, teacher=teacher, terms=terms)
    counter = _Counter(student)
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (2, 4, 4), generator=g).repeat_interleave(16, 1).repeat_interleave(16, 2)
    batch = {"img": torch.randn(2, 3, 64, 64, generator=g), "label": label,
             "target_img": torch.randn(2, 3, 64, 64, generator=g)}
    clones = copy.deepcopy(batch)
    gen = torch.Generator().manual_seed(1)
    for it in range(2):
        torch.manual_seed(it)
        out = step(batch, it, generator=gen, backward=lambda loss: loss.backward(), debug=it == 0)
        for key in ("loss/src_ce", "loss/mix_ce", "loss/instance", "loss/mic"):
            assert torch.isfinite(out.losses[key]), (it, key)
        assert "loss/feat_dist" in out.losses and "stat/mic_acc" in out.stats
        assert counter.calls == 3 * (it + 1)  # source, mixed, masked: MIC adds exactly one student forward
        if it == 0:
            assert out.debug is not None and out.debug["mic_masked"].shape == (2, 3, 64, 64)
            assert out.debug["mic_pred"].shape == (2, 64, 64)
        student.zero_grad(set_to_none=True)
    assert all(torch.equal(batch[k], clones[k]) for k in batch)
    assert all(p.grad is None for p in teacher.parameters())

"""fp32 parity of the HRDA segmentor with an independent implementation written here from the spec
(hrda_mic.md 1.3-1.6): the training forward for given detail boxes (compact fused formula, box -> grid
truncation), its loss, the test-time forward (sliding detail windows run one by one, averaged by count)
and the outer slide inference.

The backbone and the DAFormer head are the naive reference implementations of ``test_model_parity``
(explicit ops from a state dict); the scale-attention head is written out below. The context input is
the 2x2 mean (spec 1.3.1: for even sizes it equals the bilinear x0.5 resize). Weights are random, in the
reference key layout, and go into the model through an mmcv-style checkpoint (strict loading).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_model_parity import naive_head, naive_mit

from dida.checkpoint import load_checkpoint
from dida.config import HRDACfg, ModelCfg
from dida.models import build_model, inference

pytestmark = pytest.mark.parity

DIMS, HEADS, DEPTHS, SRS, DILATIONS = [8, 16, 32, 64], [1, 1, 1, 1], [1, 1, 1, 1], [8, 4, 2, 1], (1, 2, 3, 4)
CLASSES, CROP, C = 4, 128, 64  # classes, training crop, detail crop c (d = 8, o = 4)
ATOL = 1e-5


def _cfg(classwise: bool = True) -> ModelCfg:
    hrda = HRDACfg(detail_crop_size=[C, C], attention_embed_dim=12, attention_classwise=classwise)
    return ModelCfg(segmentor="hrda", backbone="mit_b0", num_classes=CLASSES, embed_dims=DIMS,
                    num_heads=HEADS, depths=DEPTHS, decoder_channels=16, aspp_dilations=list(DILATIONS),
                    hrda=hrda)


def _random_state_dict(cfg: ModelCfg, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for every key of the layout (strong enough that the attention varies)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in build_model(cfg, torch.Generator().manual_seed(0)).state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(1000)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith(("running_mean", "bias")):
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
        elif v.ndim == 1:  # LayerNorm / BatchNorm scales
            sd[k] = 1 + torch.randn(v.shape, generator=g) * 0.1
        else:
            fan_in = v[0].numel()
            sd[k] = torch.randn(v.shape, generator=g) * fan_in**-0.5
    return sd


@pytest.fixture(scope="module", params=[True, False], ids=["classwise", "single"])
def setup(request):
    cfg = _cfg(request.param)
    sd = _random_state_dict(cfg, 7)
    model = build_model(cfg, torch.Generator().manual_seed(1))
    load_checkpoint(model, {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "meta": {}})
    return model.eval(), sd


# ------------------------------------------------------------------------- independent reference


def _part(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def naive_attention(p, feats):
    """Scale-attention head (spec 1.2), eval mode: Linear embeddings, resize to level 0, concat, 1x1 conv,
    BN, ReLU, classifier -> attention logits."""
    n, _, h, w = feats[0].shape
    levels = []
    for i, f in enumerate(feats):
        proj = f"embed_layers.{i}.proj"
        e = f.flatten(2).transpose(1, 2) @ p[f"{proj}.weight"].T + p[f"{proj}.bias"]
        e = e.transpose(1, 2).reshape(n, -1, f.shape[2], f.shape[3])
        levels.append(F.interpolate(e, size=(h, w), mode="bilinear", align_corners=False) if i else e)
    x = F.conv2d(torch.cat(levels, 1), p["fuse_layer.conv.weight"])
    x = F.batch_norm(x, p["fuse_layer.bn.running_mean"], p["fuse_layer.bn.running_var"],
                     p["fuse_layer.bn.weight"], p["fuse_layer.bn.bias"], False, 0.0, 1e-5)
    return F.conv2d(F.relu(x), p["conv_seg.weight"], p["conv_seg.bias"])


def _segment(sd, x):
    """D(E(x)): DAFormer-head logits of the naive MiT features."""
    feats = naive_mit(_part(sd, "backbone."), x, HEADS, DEPTHS, SRS)
    return feats, naive_head(_part(sd, "decode_head.head."), feats, DILATIONS)[1]


def _context(sd, img):
    """Context logits z^L and attention sigmoid(A(f^L)) of the 2x2-mean-pooled input."""
    feats, z_l = _segment(sd, F.avg_pool2d(img, 2))
    return z_l, torch.sigmoid(naive_attention(_part(sd, "decode_head.scale_attention."), feats))


def _up2(x):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def naive_train_forward(sd, img, y1, x1):
    """z^F = U2(m*a) * Pad_b(z^H) + U2((1 - m*a) * z^L) with m on rows floor(y1/8) .. floor((y1+c)/8)-1."""
    b, _, h, w = img.shape
    z_l, a = _context(sd, img)
    _, z_h = _segment(sd, img[:, :, y1:y1 + C, x1:x1 + C])
    m = torch.zeros(b, 1, h // 8, w // 8)
    m[:, :, y1 // 8:(y1 + C) // 8, x1 // 8:(x1 + C) // 8] = 1
    pad = torch.zeros(b, CLASSES, h // 4, w // 4)
    pad[:, :, y1 // 4:(y1 + C) // 4, x1 // 4:(x1 + C) // 4] = z_h
    fused = _up2(m * a) * pad + _up2((1 - m * a) * z_l)
    return fused, z_h, (1 - m * a) * z_l, m * a


def naive_ce(logits, label, weight):
    """mmseg 0.16 CE: ignored pixels contribute 0 but count in the mean."""
    valid = label != 255
    nll = -F.log_softmax(logits, 1).gather(1, torch.where(valid, label, 0)[:, None])[:, 0]
    return (nll * valid * weight).sum() / label.numel()


def _grid(size, crop, stride):
    """Window starts of the mmseg grid: n = max(size - crop + stride - 1, 0) // stride + 1, clamped."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, size) - crop, 0) for i in range(n)]


def naive_predict(sd, img):
    """Test-time z^F: whole-input context, c-windows of stride c/2 one by one, logit average, no mask."""
    b, _, h, w = img.shape
    z_l, a = _context(sd, img)
    total, count = torch.zeros(b, CLASSES, h // 4, w // 4), torch.zeros(1, 1, h // 4, w // 4)
    for y in _grid(h, C, C // 2):
        for x in _grid(w, C, C // 2):
            hh, ww = min(C, h), min(C, w)
            cells = (slice(None), slice(None), slice(y // 4, (y + hh) // 4), slice(x // 4, (x + ww) // 4))
            total[cells] += _segment(sd, img[:, :, y:y + hh, x:x + ww])[1]
            count[cells] += 1
    assert count.min() > 0
    return _up2(a) * (total / count) + _up2((1 - a) * z_l)


def _report(name, a, b):
    diff = (a - b).abs().max().item()
    print(f"{name}: max abs diff {diff:.3g}")
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)
    return diff


# -------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("shape", "box"), [
    ((CROP, CROP), (0, 0)),
    ((CROP, CROP), (56, 56)),  # the largest offset the reference sampler draws
    ((CROP, CROP), (64, 64)),  # flush with the border (reachable with allow_last_offset)
    ((CROP, CROP), (4, 12)),   # not on the d grid: the context mask truncates (quirk Q6)
    ((CROP, 192), (32, 128)),
])
def test_training_forward_and_loss(setup, shape, box):
    model, sd = setup
    g = torch.Generator().manual_seed(3)
    img = torch.randn(2, 3, *shape, generator=g)
    label = torch.randint(0, CLASSES, (2, *shape), generator=g)
    label[:, ::7] = 255
    weight = torch.rand(2, *shape, generator=g)
    with torch.no_grad():
        out = model(img, detail_box=box)
        terms = model.loss_terms(out, label, weight)
        fused, z_h, scaled, att = naive_train_forward(sd, img, *box)
    _report("fused logits", out.logits, fused)
    _report("detail logits", out.detail_logits, z_h)
    _report("scaled context logits", out.context_logits, scaled)
    _report("masked attention", out.attention, att)
    y1, x1 = box
    crop = (slice(None), slice(y1, y1 + C), slice(x1, x1 + C))
    ref_seg = 0.9 * naive_ce(F.interpolate(fused, shape, mode="bilinear", align_corners=False), label, weight)
    ref_det = 0.1 * naive_ce(F.interpolate(z_h, (C, C), mode="bilinear", align_corners=False),
                             label[crop], weight[crop])
    _report("loss seg", terms["seg"], ref_seg)
    _report("loss detail", terms["detail"], ref_det)


def test_sampled_box_is_used(setup):
    model, sd = setup
    img = torch.randn(1, 3, CROP, CROP, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(img, generator=torch.Generator().manual_seed(11))
        fused = naive_train_forward(sd, img, out.detail_box.y1, out.detail_box.x1)[0]
    _report("fused logits (drawn box)", out.logits, fused)


@pytest.mark.parametrize("shape", [(CROP, CROP), (CROP, 192), (C, 96)])
def test_test_time_forward(setup, shape):
    model, sd = setup
    img = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model.predict(img)
        ref = naive_predict(sd, img)
        logits = model.logits(img)
    _report("test-time fused logits", out.logits, ref)
    _report("logits at input size", logits, F.interpolate(ref, shape, mode="bilinear", align_corners=False))


@pytest.mark.parametrize("batched", [False, True])
def test_slide_inference(setup, batched):
    model, sd = setup
    img = torch.randn(1, 3, CROP, 256, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        probs = inference(model, img, "slide", crop_size=CROP, stride=64, batched_slide=batched)
        total, count = torch.zeros(1, CLASSES, CROP, 256), torch.zeros(1, 1, CROP, 256)
        for x in _grid(256, CROP, 64):  # outer windows at x = 0, 64, 128
            win = img[:, :, :, x:x + CROP]
            total[..., x:x + CROP] += F.interpolate(naive_predict(sd, win), (CROP, CROP), mode="bilinear",
                                                    align_corners=False)
            count[..., x:x + CROP] += 1
        ref = (total / count).softmax(1)
    _report(f"slide inference probabilities (batched={batched})", probs, ref)

"""HRDA segmentor: key layout and parameter counts, detail-box sampler, fusion quirks, losses, test-time
forward and debug branches, checkpoints (mmcv / dida), activation checkpointing, gradients."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from dida.checkpoint import load_checkpoint, model_cfg_from_checkpoint
from dida.config import HRDACfg, ModelCfg, load_config
from dida.errors import ConfigError
from dida.models import HRDAOutput, HRDASegmentor, build_model, inference, slide_logits
from dida.models.hrda import DetailBox, rescale, sample_detail_box
from dida.models.registry import SEGMENTORS

CROP, DETAIL = 128, 64


def tiny_hrda_cfg(tiny_model_kwargs: dict, **hrda) -> ModelCfg:
    """The tiny MiT/DAFormer model of conftest as HRDA with a 64^2 detail crop (d = 8)."""
    kw = dict(tiny_model_kwargs)
    options = {"detail_crop_size": [DETAIL, DETAIL], "attention_embed_dim": 12, **hrda}
    return ModelCfg(segmentor="hrda", hrda=HRDACfg(**options), **kw)


@pytest.fixture
def tiny(tiny_model_kwargs, generator) -> HRDASegmentor:
    return build_model(tiny_hrda_cfg(tiny_model_kwargs), generator)


def _img(b=2, h=CROP, w=CROP, seed=1):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ layout, counts


def spec_layout(num_classes=19, dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), sr=(8, 4, 2, 1),
                channels=256, attention=256) -> dict[str, list[int]]:
    """The HRDA segmentor's state-dict keys and shapes, written from the spec text alone
    (method.md 1.2 backbone, method.md 1.4 DAFormer head, hrda_mic.md 1.2 HRDA head)."""
    out: dict[str, list[int]] = {}
    prev = 3
    for s in range(4):
        c, k = dims[s], 7 if s == 0 else 3
        out |= {f"backbone.patch_embed{s + 1}.proj.weight": [c, prev, k, k],
                f"backbone.patch_embed{s + 1}.proj.bias": [c],
                f"backbone.patch_embed{s + 1}.norm.weight": [c],
                f"backbone.patch_embed{s + 1}.norm.bias": [c]}
        for i in range(depths[s]):
            b = f"backbone.block{s + 1}.{i}"
            shapes = {"norm1.weight": [c], "norm1.bias": [c], "attn.q.weight": [c, c], "attn.q.bias": [c],
                      "attn.kv.weight": [2 * c, c], "attn.kv.bias": [2 * c], "attn.proj.weight": [c, c],
                      "attn.proj.bias": [c], "norm2.weight": [c], "norm2.bias": [c],
                      "mlp.fc1.weight": [4 * c, c], "mlp.fc1.bias": [4 * c],
                      "mlp.dwconv.dwconv.weight": [4 * c, 1, 3, 3], "mlp.dwconv.dwconv.bias": [4 * c],
                      "mlp.fc2.weight": [c, 4 * c], "mlp.fc2.bias": [c]}
            if sr[s] > 1:
                shapes |= {"attn.sr.weight": [c, c, sr[s], sr[s]], "attn.sr.bias": [c],
                           "attn.norm.weight": [c], "attn.norm.bias": [c]}
            out |= {f"{b}.{k2}": v for k2, v in shapes.items()}
        out |= {f"backbone.norm{s + 1}.weight": [c], f"backbone.norm{s + 1}.bias": [c]}
        prev = c

    def bn(prefix, n):
        return {f"{prefix}.weight": [n], f"{prefix}.bias": [n], f"{prefix}.running_mean": [n],
                f"{prefix}.running_var": [n], f"{prefix}.num_batches_tracked": []}

    def embeds(prefix, width):
        d = {}
        for i, ci in enumerate(dims):
            d |= {f"{prefix}.embed_layers.{i}.proj.weight": [width, ci],
                  f"{prefix}.embed_layers.{i}.proj.bias": [width]}
        return d

    h = "decode_head.head"
    out |= {f"{h}.conv_seg.weight": [num_classes, channels, 1, 1], f"{h}.conv_seg.bias": [num_classes]}
    out |= embeds(h, channels)
    cat = 4 * channels
    out |= {f"{h}.fuse_layer.aspp_modules.0.conv.weight": [channels, cat, 1, 1]}
    out |= bn(f"{h}.fuse_layer.aspp_modules.0.bn", channels)
    for j in (1, 2, 3):
        m = f"{h}.fuse_layer.aspp_modules.{j}"
        out |= {f"{m}.depthwise_conv.conv.weight": [cat, 1, 3, 3],
                f"{m}.pointwise_conv.conv.weight": [channels, cat, 1, 1]}
        out |= bn(f"{m}.depthwise_conv.bn", cat) | bn(f"{m}.pointwise_conv.bn", channels)
    out |= {f"{h}.fuse_layer.bottleneck.conv.weight": [channels, cat, 3, 3]}
    out |= bn(f"{h}.fuse_layer.bottleneck.bn", channels)
    a = "decode_head.scale_attention"
    out |= {f"{a}.conv_seg.weight": [num_classes, attention, 1, 1], f"{a}.conv_seg.bias": [num_classes]}
    out |= embeds(a, attention)
    out |= {f"{a}.fuse_layer.conv.weight": [attention, 4 * attention, 1, 1]}
    out |= bn(f"{a}.fuse_layer.bn", attention)
    return out


def _shapes(model) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _b5() -> HRDASegmentor:
    with torch.device("meta"):
        return build_model(ModelCfg(segmentor="hrda"))


def test_b5_layout_from_spec_text():
    expected = spec_layout()
    assert len(expected) == 1126
    assert sum(k.startswith("backbone.") for k in expected) == 1052
    assert sum(k.startswith("decode_head.head.") for k in expected) == 58
    assert sum(k.startswith("decode_head.scale_attention.") for k in expected) == 16
    assert _shapes(_b5()) == expected


def test_b5_layout_matches_reference_json(reference_dir):
    data = json.loads((reference_dir / "keys" / "hrda_mic_mitb5_checkpoint_layout.json").read_text())
    entries = {e["key"]: e["shape"] for e in data["state_dict"]}
    assert len(entries) == 3378
    ours = _shapes(_b5())
    for prefix in ("model.", "ema_model.", "imnet_model."):
        part = {k[len(prefix):]: v for k, v in entries.items() if k.startswith(prefix)}
        assert part == ours, prefix
    assert spec_layout() == ours


def test_tiny_layout_from_spec_text(tiny):
    assert _shapes(tiny) == spec_layout(4, (8, 16, 32, 64), (1, 1, 1, 1), channels=16, attention=12)


def test_b5_parameter_counts():
    model = _b5()

    def count(m):
        return sum(p.numel() for p in m.parameters())

    att = model.decode_head.scale_attention
    assert count(model) == 85_685_990
    assert count(model.backbone) == 81_443_008
    assert count(model.decode_head.head) == 3_712_275
    assert count(att) == 530_707
    assert count(att.embed_layers) == 263_168
    assert count(att.fuse_layer.conv) == 262_144
    assert count(att.fuse_layer.bn) == 512
    assert count(att.conv_seg) == 4_883


def test_init_and_generator(tiny_model_kwargs):
    cfg = tiny_hrda_cfg(tiny_model_kwargs)
    a = build_model(cfg, torch.Generator().manual_seed(5))
    b = build_model(cfg, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    big = build_model(ModelCfg(segmentor="hrda", backbone="mit_b0", num_classes=19),
                      torch.Generator().manual_seed(1)).decode_head.scale_attention
    assert abs(big.conv_seg.weight.std().item() - 0.01) < 0.002 and not big.conv_seg.bias.any()
    fan_out = 256  # kaiming normal, fan_out mode, ReLU gain: std sqrt(2 / fan_out)
    assert abs(big.fuse_layer.conv.weight.std().item() - (2 / fan_out) ** 0.5) < 0.005
    assert torch.equal(big.fuse_layer.bn.weight, torch.ones(256)) and not big.fuse_layer.bn.bias.any()
    bound = 1 / 64**0.5  # PyTorch default Linear init: U(+-1/sqrt(fan_in)) for the bias
    assert big.embed_layers[1].proj.bias.abs().max() <= bound


def test_registry_detection_and_fields(tiny):
    sd = tiny.state_dict()
    assert SEGMENTORS["hrda"].detect(sd) and not SEGMENTORS["encoder_decoder"].detect(sd)
    enc = build_model(ModelCfg(backbone="mit_b0", num_classes=4, embed_dims=[8, 16, 32, 64],
                               num_heads=[1] * 4, depths=[1] * 4, decoder_channels=16))
    assert not SEGMENTORS["hrda"].detect(enc.state_dict())
    fields = SEGMENTORS["hrda"].infer_fields(sd)
    assert fields["num_classes"] == 4 and fields["decoder_channels"] == 16
    assert fields["hrda"].attention_embed_dim == 12 and fields["hrda"].attention_classwise


# ---------------------------------------------------------------------------------- the box


def test_box_sampler_reference_range_and_option():
    g = torch.Generator().manual_seed(0)
    kw = {"crop_size": (512, 512), "divisor": 8}
    ys, xs = set(), set()
    for _ in range(3000):
        box = sample_detail_box(1024, 1024, allow_last_offset=False, generator=g, **kw)
        ys.add(box.y1)
        xs.add(box.x1)
        assert (box.height, box.width) == (512, 512)
    assert ys == xs == set(range(0, 505, 8))  # 512 (flush with the border) never drawn: quirk Q1
    reach = {sample_detail_box(1024, 1024, allow_last_offset=True, generator=g, **kw).y1 for _ in range(3000)}
    assert reach == set(range(0, 513, 8))
    # tiny sizes: floor((128 - 64 + 1) / 8) = 8 choices
    tiny = {sample_detail_box(CROP, CROP, crop_size=(DETAIL, DETAIL), divisor=8, allow_last_offset=False,
                              generator=g).x1 for _ in range(500)}
    assert tiny == set(range(0, 57, 8))
    # crop == image: the whole image
    assert sample_detail_box(64, 64, crop_size=(64, 64), divisor=8, allow_last_offset=False) == (0, 0, 64, 64)
    with pytest.raises(ValueError, match="larger than the input"):
        sample_detail_box(60, 64, crop_size=(64, 64), divisor=8, allow_last_offset=False)


def test_box_sampler_reproducible():
    def draws(gen=None):
        return [tuple(sample_detail_box(1024, 2048, crop_size=(512, 512), divisor=8, allow_last_offset=False,
                                        generator=gen)) for _ in range(20)]

    assert draws(torch.Generator().manual_seed(3)) == draws(torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    a = draws()
    torch.manual_seed(7)
    assert draws() == a and len(set(a)) > 1  # the global RNG by default


def test_forward_draws_box_from_generator_or_global_rng(tiny):
    img = _img()
    a = tiny(img, generator=torch.Generator().manual_seed(4)).detail_box
    b = tiny(img, generator=torch.Generator().manual_seed(4)).detail_box
    assert a == b and a.y1 % 8 == 0 and a.x1 % 8 == 0 and a.y1 <= 56 and a.x1 <= 56
    torch.manual_seed(9)
    c = tiny(img).detail_box
    torch.manual_seed(9)
    assert tiny(img).detail_box == c


def test_alignment_errors(tiny, tiny_model_kwargs):
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny(_img(h=100))
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny.predict(_img(w=132))
    with pytest.raises(ValueError, match="multiples of the output stride 4"):
        tiny(_img(), detail_box=(2, 0))
    with pytest.raises(ValueError, match="inside"):
        tiny(_img(), detail_box=(72, 0))
    with pytest.raises(ValueError, match="smaller than the detail crop"):
        tiny(_img(h=56))
    with pytest.raises(ConfigError, match="model.hrda"):
        build_model(tiny_hrda_cfg(tiny_model_kwargs, detail_crop_size=[60, 60]))
    with pytest.raises(ConfigError, match="model.hrda"):
        build_model(tiny_hrda_cfg(tiny_model_kwargs, crop_divisor=6))
    with pytest.raises(ConfigError, match="model.hrda"):
        build_model(tiny_hrda_cfg(tiny_model_kwargs, scales=[0.5, 0.75]))
    with pytest.raises(ConfigError, match="loss_weight"):
        build_model(tiny_hrda_cfg(tiny_model_kwargs, hr_loss_weight=0.7, lr_loss_weight=0.5))


# ------------------------------------------------------------------------------- forward, fusion


def test_training_forward_outputs(tiny):
    tiny.eval()
    img = _img()
    out = tiny(img, detail_box=(16, 40))
    assert isinstance(out, HRDAOutput)
    assert out.detail_box == DetailBox(16, 40, DETAIL, DETAIL)
    assert out.logits.shape == (2, 4, 32, 32)
    assert out.detail_logits.shape == (2, 4, 16, 16)
    assert out.context_logits.shape == (2, 4, 16, 16)
    assert out.attention.shape == (2, 4, 16, 16)
    assert out.embedding.shape == (2, 16, 16, 16) and tiny.embed_dim == 16
    shapes = [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    assert [tuple(f.shape) for f in out.features] == shapes
    # features and embedding are the context branch's: the whole crop at half resolution
    context = F.interpolate(img, scale_factor=0.5, mode="bilinear", align_corners=False)
    feats = tiny.backbone(context)
    for a, b in zip(out.features, feats):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(out.embedding, tiny.decode_head.head(feats)[0], rtol=0, atol=0)
    for a, b in zip(tiny.extract_features(img), feats):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the attention is zero outside the detail window on the context grid (rows 2..9, cols 5..12)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[2:10, 5:13] = True
    assert not out.attention[..., ~inside].any() and (out.attention[..., inside] > 0).all()


def test_weight_leak_ring_outside_window(tiny):
    """Quirk Q8: the mask acts before the x2 upsampling, so the ring just outside the detail window
    carries attention on a zero detail logit: there fused = U(a)*0 + U((1-a) z^L) != U(z^L)."""
    tiny.eval()
    with torch.no_grad():
        out = tiny(_img(), detail_box=(16, 40))
        up_att = F.interpolate(out.attention, scale_factor=2, mode="bilinear", align_corners=False)
    # the fused window is rows 4..19, cols 10..25; the ring outside: row 3 / 20, col 9 / 26
    assert (up_att[..., 3, 10:26] > 0).all() and (up_att[..., 20, 10:26] > 0).all()
    assert (up_att[..., 4:20, 9] > 0).all() and (up_att[..., 4:20, 26] > 0).all()
    assert not up_att[..., :3, :].any() and not up_att[..., :, :9].any()
    # row 3 samples context row 1.25: 0.75 * (outside, 0) + 0.25 * (inside row 2, upsampled along x)
    row = F.interpolate(out.attention[..., 2:3, :], scale_factor=(1, 2), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up_att[..., 3, :], 0.25 * row[..., 0, :])
    # on the ring the detail term is zero while U((1 - a) z^L) has lost part of z^L: not U(z^L)
    fused_without_leak = F.interpolate(out.context_logits / (1 - out.attention), scale_factor=2,
                                       mode="bilinear", align_corners=False)
    assert not torch.allclose(out.logits[..., 3, 10:26], fused_without_leak[..., 3, 10:26])
    torch.testing.assert_close(out.logits[..., 0, :], fused_without_leak[..., 0, :])


def test_loss_terms(tiny):
    tiny.eval()
    img, label = _img(), torch.randint(0, 4, (2, CROP, CROP), generator=torch.Generator().manual_seed(2))
    label[:, :5] = 255
    weight = torch.rand(2, CROP, CROP, generator=torch.Generator().manual_seed(3))
    out = tiny(img, detail_box=(8, 32))
    terms = tiny.loss_terms(out, label, weight)
    assert set(terms) == {"seg", "detail"}

    def ce(logits, lab, w):
        lab = lab.clone()
        valid = lab != 255
        lab[~valid] = 0
        nll = -F.log_softmax(logits, 1).gather(1, lab[:, None])[:, 0]
        return (nll * valid * w).sum() / lab.numel()

    up = F.interpolate(out.logits, (CROP, CROP), mode="bilinear", align_corners=False)
    torch.testing.assert_close(terms["seg"], 0.9 * ce(up, label, weight))
    det = F.interpolate(out.detail_logits, (DETAIL, DETAIL), mode="bilinear", align_corners=False)
    box = (slice(None), slice(8, 72), slice(32, 96))
    torch.testing.assert_close(terms["detail"], 0.1 * ce(det, label[box], weight[box]))
    torch.testing.assert_close(tiny.loss(out, label, weight), terms["seg"] + terms["detail"])
    # lambda_l > 0 adds the CE of the attention-scaled context logits (quirk Q7)
    tiny.lr_loss_weight = 0.2
    terms = tiny.loss_terms(out, label, weight)
    ctx = F.interpolate(out.context_logits, (CROP, CROP), mode="bilinear", align_corners=False)
    torch.testing.assert_close(terms["context"], 0.2 * ce(ctx, label, weight))
    torch.testing.assert_close(terms["seg"], 0.7 * ce(up, label, weight))
    # no weight: all ones
    tiny.lr_loss_weight = 0.0
    ones = torch.ones(2, DETAIL, DETAIL)
    torch.testing.assert_close(tiny.loss_terms(out, label)["detail"], 0.1 * ce(det, label[box], ones))


def test_every_parameter_gets_a_gradient(tiny_model_kwargs, generator):
    kw = dict(tiny_model_kwargs, drop_path_rate=0.0, dropout_ratio=0.0)
    model = build_model(tiny_hrda_cfg(kw), generator).train()
    img = _img()
    label = torch.randint(0, 4, (2, CROP, CROP), generator=generator)
    out = model(img, generator=generator)
    loss = model.loss(out, label)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(out.logits).all()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_activation_checkpointing_is_identical(tiny_model_kwargs):
    grads, losses = [], []
    for flag in (False, True):
        kw = dict(tiny_model_kwargs, drop_path_rate=0.3)
        model = build_model(tiny_hrda_cfg(kw, checkpoint_backbone=flag), torch.Generator().manual_seed(1))
        model.train()
        assert model.checkpoint_backbone is flag
        torch.manual_seed(123)  # drop-path and dropout draw from the global RNG; the box too
        out = model(_img())
        label = torch.randint(0, 4, (2, CROP, CROP), generator=torch.Generator().manual_seed(2))
        loss = model.loss(out, label)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.equal(losses[0], losses[1])
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


# ---------------------------------------------------------------------------------- test time


def test_predict_and_branches(tiny):
    tiny.eval()
    img = _img(h=CROP, w=192)
    with torch.no_grad():
        out = tiny.predict(img)
        br = tiny.predict_branches(img)
    assert out.detail_box is None and out.logits.shape == (2, 4, 32, 48)
    assert out.attention.shape == (2, 4, 16, 24) and (out.attention > 0).all()  # no mask at test time

    def up(x):
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    # fused = U(a) * detail + U((1 - a) z^L)
    torch.testing.assert_close(out.logits, up(out.attention) * out.detail_logits + up(out.context_logits))
    torch.testing.assert_close(br.detail, out.detail_logits, rtol=0, atol=0)
    z_l = out.context_logits / (1 - out.attention)
    torch.testing.assert_close(br.context, up(z_l))
    att = (up(out.attention) * out.logits.softmax(1)).sum(1, keepdim=True)
    torch.testing.assert_close(br.attention, att)
    assert br.attention.shape == (2, 1, 32, 48)
    # the branch views run through the generic slide inference
    view = tiny.branch("attention")
    assert view.num_classes == 1 and view.backbone is tiny.backbone
    with torch.no_grad():
        slid = slide_logits(view, img, CROP, 64)
        ctx = inference(tiny.branch("context"), img)
    assert slid.shape == (2, 1, CROP, 192) and ((slid > 0) & (slid < 1)).all()
    torch.testing.assert_close(ctx, F.interpolate(br.context, (CROP, 192), mode="bilinear").softmax(1))


def test_slide_options(tiny_model_kwargs, generator):
    img = _img(b=1, h=CROP, w=CROP)
    results = {}
    for overlap in (True, False):
        for slide in (True, False):
            m = build_model(tiny_hrda_cfg(tiny_model_kwargs, slide_overlap=overlap, slide_inference=slide),
                            torch.Generator().manual_seed(0)).eval()
            with torch.no_grad():
                results[overlap, slide] = m.predict(img).logits
    # a 128^2 input: 3x3 windows (stride 32) vs 2x2 (stride 64) vs one whole pass differ
    assert not torch.allclose(results[True, True], results[False, True])
    assert not torch.allclose(results[False, True], results[True, False])
    torch.testing.assert_close(results[True, False], results[False, False], rtol=0, atol=0)


def test_batched_slide_logits(tiny, tiny_model_kwargs, generator):
    tiny.eval()
    img = _img(b=2, h=CROP, w=256)
    with torch.no_grad():
        a = inference(tiny, img, "slide", crop_size=CROP, stride=64)
        b = inference(tiny, img, "slide", crop_size=CROP, stride=64, batched_slide=True)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    from dida.models import build_segmentor

    enc = build_segmentor(**tiny_model_kwargs, generator=generator).eval()
    with torch.no_grad():
        a = slide_logits(enc, img, 64, 48)
        b = slide_logits(enc, img, 64, 48, batched=True)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_blur_detail_and_no_crop(tiny_model_kwargs):
    g = torch.Generator().manual_seed(0)
    blur = build_model(tiny_hrda_cfg(tiny_model_kwargs, blur_detail=True), g).eval()
    img = _img()
    with torch.no_grad():
        out = blur(img, detail_box=(0, 8))
        blurred = rescale(rescale(img, 0.5), 2.0)
        _, ref = blur.decode_head.head(blur.backbone(blurred[:, :, 0:64, 8:72]))
    torch.testing.assert_close(out.detail_logits, ref, rtol=0, atol=0)
    whole = build_model(tiny_hrda_cfg(tiny_model_kwargs, detail_crop_size=None), g).eval()
    with torch.no_grad():
        out = whole(img)
        pred = whole.predict(img)
    assert out.detail_box is None and out.detail_logits.shape == (2, 4, 32, 32) and (out.attention > 0).all()
    torch.testing.assert_close(out.logits, pred.logits, rtol=0, atol=0)
    terms = whole.loss_terms(out, torch.zeros(2, CROP, CROP, dtype=torch.long))
    assert set(terms) == {"seg", "detail"}
    with pytest.raises(ValueError, match="no detail crop"):
        whole(img, detail_box=(0, 0))


def test_fixed_attention(tiny_model_kwargs):
    cfg = tiny_hrda_cfg(tiny_model_kwargs, fixed_attention=0.5)
    model = build_model(cfg, torch.Generator().manual_seed(0))
    model.eval()
    sd = model.state_dict()
    assert not any(k.startswith("decode_head.scale_attention.") for k in sd)
    assert SEGMENTORS["hrda"].detect(sd) and not SEGMENTORS["encoder_decoder"].detect(sd)
    assert SEGMENTORS["hrda"].infer_fields(sd)["hrda"].fixed_attention == 0.5
    with torch.no_grad():
        out = model(_img(), detail_box=(0, 0))
        pred = model.predict(_img())
    assert out.attention.shape == (2, 1, 16, 16) and out.attention[..., :8, :8].eq(0.5).all()
    assert not out.attention[..., 8:, :].any()
    assert pred.attention.eq(0.5).all()


# -------------------------------------------------------------------------------- checkpoints


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(40000)
    return model


def _mmcv_hrda_checkpoint(cfg: ModelCfg):
    models = {name: _randomise(build_model(cfg), seed).eval()
              for seed, name in enumerate(("model", "ema_model", "imnet_model"))}
    sd = {f"{name}.{k}": v.clone() for name, m in models.items() for k, v in m.state_dict().items()}
    meta = {"iter": 40000, "CLASSES": ["road", "sidewalk", "building", "wall"], "seed": 2}
    return {"meta": meta, "state_dict": sd, "optimizer": {}}, models


def test_mmcv_checkpoint_loads_student_and_teacher(tiny_model_kwargs):
    cfg = tiny_hrda_cfg(tiny_model_kwargs)
    ckpt, models = _mmcv_hrda_checkpoint(cfg)
    keys = ckpt["state_dict"]
    assert sum(k.startswith("model.decode_head.scale_attention.") for k in keys) == 16
    assert sum(k.startswith("ema_model.decode_head.head.") for k in keys) == 58
    inferred = model_cfg_from_checkpoint(ckpt)
    assert inferred.segmentor == "hrda" and inferred.num_classes == 4 and inferred.decoder_channels == 16
    assert inferred.embed_dims == [8, 16, 32, 64] and inferred.hrda.attention_embed_dim == 12
    img = _img()
    for which in ("model", "ema_model"):
        dst = build_model(cfg, torch.Generator().manual_seed(99)).eval()
        info = load_checkpoint(dst, ckpt, which=which)
        assert info["format"] == "mmcv" and info["iteration"] == 40000 and info["target"] == "segmentor"
        with torch.no_grad():
            a, b = models[which].predict(img), dst.predict(img)
            c, d = models[which](img, detail_box=(8, 16)), dst(img, detail_box=(8, 16))
        assert torch.equal(a.logits, b.logits) and torch.equal(c.logits, d.logits)
    # the ImageNet part's backbone loads into a bare backbone too
    bare = build_model(cfg).backbone
    load_checkpoint(bare, ckpt, which="imnet_model")
    assert torch.equal(bare.patch_embed1.proj.weight, models["imnet_model"].backbone.patch_embed1.proj.weight)
    # an HRDA checkpoint into an encoder-decoder fails clearly, naming the architecture
    from dida.errors import CheckpointError

    enc = build_model(dataclasses.replace(cfg, segmentor="encoder_decoder"))
    with pytest.raises(CheckpointError, match="hrda"):
        load_checkpoint(enc, ckpt)


def test_b5_mmcv_layout_inferred(reference_dir):
    """The reference MIC(HRDA) B5 layout (as meta tensors) is recognised as HRDA with the preset head."""
    data = json.loads((reference_dir / "keys" / "hrda_mic_mitb5_checkpoint_layout.json").read_text())
    sd = {e["key"]: torch.empty(e["shape"], device="meta") for e in data["state_dict"]}
    cfg = model_cfg_from_checkpoint({"state_dict": sd, "meta": data["meta"]})
    assert cfg == ModelCfg(segmentor="hrda", backbone="mit_b5", num_classes=19)


def test_b5_spec_layout_inferred():
    sd = {f"{p}{k}": torch.empty(v, device="meta") for p in ("model.", "ema_model.", "imnet_model.")
          for k, v in spec_layout().items()}
    cfg = model_cfg_from_checkpoint({"state_dict": sd, "meta": {}})
    assert cfg == ModelCfg(segmentor="hrda", num_classes=19)


def test_imagenet_backbone_weights_load(tiny):
    """``model.pretrained`` goes into the shared backbone as for the encoder-decoder."""
    sd = {k: torch.randn_like(v) for k, v in tiny.backbone.state_dict().items()}
    sd["head.weight"], sd["head.bias"] = torch.zeros(1000, 64), torch.zeros(1000)
    info = load_checkpoint(tiny.backbone, sd)
    assert info["format"] == "mit" and torch.equal(tiny.backbone.norm4.bias, sd["norm4.bias"])


def test_dida_checkpoint_config_round_trip(tiny_model_kwargs, tmp_path):
    cfg = tiny_hrda_cfg(tiny_model_kwargs, hr_loss_weight=0.2, allow_last_offset=True)
    ckpt = {"format": "dida", "model": build_model(cfg).state_dict(),
            "config": yaml.safe_dump({"model": dataclasses.asdict(cfg)})}
    back = model_cfg_from_checkpoint(ckpt)
    assert back == cfg and isinstance(back.hrda, HRDACfg)


def test_config_keys():
    cfg = load_config(None, ["model.segmentor=hrda", "model.hrda.detail_crop_size=[256,256]",
                             "model.hrda.allow_last_offset=true"])
    assert cfg.model.hrda.detail_crop_size == [256, 256] and cfg.model.hrda.allow_last_offset
    assert HRDACfg().scales == [0.5, 1.0] and HRDACfg().hr_loss_weight == 0.1
    with pytest.raises(ConfigError):
        load_config(None, ["model.hrda.no_such_key=1"])

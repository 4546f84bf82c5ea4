"""Segmentor: outputs, builders, gradients, whole/slide inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dida.config import ModelCfg
from dida.models import Segmentor, SegmentorOutput, build_model, build_segmentor, inference
from dida.models.inference import slide_logits


@pytest.fixture
def tiny(tiny_model_kwargs, generator) -> Segmentor:
    return build_segmentor(**tiny_model_kwargs, generator=generator).eval()


def _randomise_bn(model: Segmentor, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_forward_outputs(tiny):
    img = torch.randn(2, 3, 64, 48)
    out = tiny(img)
    assert isinstance(out, SegmentorOutput)
    shapes = [tuple(f.shape) for f in out.features]
    assert shapes == [(2, 8, 16, 12), (2, 16, 8, 6), (2, 32, 4, 3), (2, 64, 2, 2)]
    assert out.embedding.shape == (2, 16, 16, 12)
    assert out.logits.shape == (2, 4, 16, 12)
    assert tiny.num_classes == 4 and tiny.embed_dim == 16
    emb, logits = tiny.encode_decode(img)
    assert emb.shape == (2, 16, 64, 48) and logits.shape == (2, 4, 64, 48)
    up = F.interpolate(out.logits, (64, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, up)
    assert len(tiny.extract_features(img)) == 4


def test_builder_from_cfg_and_generator(tiny_model_kwargs):
    cfg = ModelCfg(
        backbone="mit_b0", embed_dims=[8, 16, 32, 64], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1],
        decoder_channels=16, num_classes=4, aspp_dilations=[1, 2, 3, 4], dropout_ratio=0.0,
    )
    a = build_model(cfg, generator=torch.Generator().manual_seed(5))
    b = build_model(cfg, generator=torch.Generator().manual_seed(5))
    assert a.decode_head.fuse_layer.dilations == (1, 2, 3, 4)
    assert a.num_classes == 4 and a.backbone.embed_dims == [8, 16, 32, 64]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_every_parameter_gets_a_gradient(tiny_model_kwargs, generator):
    model = build_segmentor(**tiny_model_kwargs, drop_path_rate=0.0, dropout_ratio=0.0, generator=generator)
    model.train()
    out = model(torch.randn(2, 3, 64, 64, generator=generator))
    loss = out.logits.logsumexp(1).mean() + out.embedding.mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(out.logits).all()


def test_train_mode_drop_path_is_finite(tiny_model_kwargs, generator):
    model = build_segmentor(**tiny_model_kwargs, drop_path_rate=0.5, generator=generator).train()
    out = model(torch.randn(4, 3, 32, 32, generator=generator))
    out.logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_whole_and_slide_agree_within_one_window(tiny):
    _randomise_bn(tiny)
    img = torch.randn(1, 3, 48, 40)
    whole = inference(tiny, img, "whole")
    slide = inference(tiny, img, "slide", crop_size=(64, 64), stride=(32, 32))
    exact = inference(tiny, img, "slide", crop_size=(48, 40), stride=(16, 16))
    torch.testing.assert_close(whole, slide)
    torch.testing.assert_close(whole, exact)
    assert whole.shape == (1, 4, 48, 40)
    torch.testing.assert_close(whole.sum(1), torch.ones(1, 48, 40))


def test_slide_matches_naive_window_average(tiny):
    img = torch.randn(2, 3, 80, 70)
    crop, stride = (48, 40), (24, 32)
    got = slide_logits(tiny, img, crop, stride)
    # naive: enumerate windows as mmseg does, accumulate per pixel
    total = torch.zeros(2, 4, 80, 70)
    count = torch.zeros(1, 1, 80, 70)
    h_grids = max(80 - 48 + 24 - 1, 0) // 24 + 1
    w_grids = max(70 - 40 + 32 - 1, 0) // 32 + 1
    windows = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * 24, wi * 32
            y2, x2 = min(y1 + 48, 80), min(x1 + 40, 70)
            y1, x1 = max(y2 - 48, 0), max(x2 - 40, 0)
            windows.append((y1, y2, x1, x2))
            with torch.no_grad():
                _, lg = tiny.encode_decode(img[:, :, y1:y2, x1:x2])
            total += F.pad(lg, (x1, 70 - x2, y1, 80 - y2))
            count[:, :, y1:y2, x1:x2] += 1
    assert (h_grids, w_grids) == (3, 2) and len(set(windows)) == 6
    torch.testing.assert_close(got, total / count)


def test_out_size_two_step_resize_and_softmax(tiny):
    img = torch.randn(1, 3, 32, 64)
    probs = inference(tiny, img, "whole", out_size=(64, 128))
    with torch.no_grad():
        logits = tiny(img).logits
    step1 = F.interpolate(logits, (32, 64), mode="bilinear", align_corners=False)
    step2 = F.interpolate(step1, (64, 128), mode="bilinear", align_corners=False)
    torch.testing.assert_close(probs, step2.softmax(1))


def test_inference_leaves_mode_and_grad_alone(tiny):
    tiny.train()
    img = torch.randn(1, 3, 32, 32)
    probs = inference(tiny, img, "whole")
    assert tiny.training and not probs.requires_grad
    tiny.eval()
    assert not tiny.training


def test_channels_last_inference(tiny):
    img = torch.randn(2, 3, 64, 64)
    a = inference(tiny, img, "whole")
    b = inference(tiny, img.to(memory_format=torch.channels_last), "whole")
    c = inference(tiny, img.to(memory_format=torch.channels_last), "slide", crop_size=32, stride=16)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert c.shape == a.shape and torch.isfinite(c).all()


def test_inference_argument_errors(tiny):
    img = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="crop_size and stride"):
        inference(tiny, img, "slide")
    with pytest.raises(ValueError, match="unknown inference mode"):
        inference(tiny, img, "tiles")


def test_inference_refuses_raw_images(tiny_model_kwargs):
    from dida.errors import DataError

    model = build_segmentor(**tiny_model_kwargs, generator=torch.Generator().manual_seed(0)).eval()
    raw = torch.randint(0, 256, (1, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    with pytest.raises(DataError, match="normalised float"):
        inference(model, raw)
    with pytest.raises(DataError, match="raw 0-255 pixels"):
        inference(model, raw.float())
    probs = inference(model, (raw.float() - 120.0) / 58.0)  # normalised: fine
    assert probs.shape == (1, 4, 32, 32)

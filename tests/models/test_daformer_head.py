"""DAFormer head (sepaspp): shapes, key names, the returned embedding, initialisation."""

from __future__ import annotations

import torch

from dida.models import DAFormerHead
from dida.models.layers import ConvModule, DepthwiseSeparableConvModule


def _features(b=2, h=16, w=12, dims=(8, 16, 32, 64)):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, c, -(-h // 2**i), -(-w // 2**i), generator=g) for i, c in enumerate(dims)]


def test_shapes_and_embedding():
    head = DAFormerHead(in_channels=(8, 16, 32, 64), channels=16, num_classes=5).eval()
    feats = _features()
    emb, logits = head(feats)
    assert emb.shape == (2, 16, 16, 12)
    assert logits.shape == (2, 5, 16, 12)
    assert torch.all(emb >= 0)  # ReLU output of the bottleneck, not normalised
    # logits = conv_seg(embedding) in eval mode (dropout off)
    torch.testing.assert_close(logits, head.conv_seg(emb))


def test_key_names_match_mmcv_layout():
    head = DAFormerHead(in_channels=(8, 16, 32, 64), channels=16, num_classes=5)
    keys = set(head.state_dict())
    for i in range(4):
        assert f"embed_layers.{i}.proj.weight" in keys and f"embed_layers.{i}.proj.bias" in keys
    assert "fuse_layer.aspp_modules.0.conv.weight" in keys
    assert "fuse_layer.aspp_modules.0.conv.bias" not in keys
    for j in (1, 2, 3):
        for part in ("depthwise_conv", "pointwise_conv"):
            for leaf in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                         "bn.num_batches_tracked"):
                assert f"fuse_layer.aspp_modules.{j}.{part}.{leaf}" in keys
    assert "fuse_layer.bottleneck.conv.weight" in keys and "conv_seg.bias" in keys
    assert len(keys) == 58


def test_aspp_branches_follow_dilations():
    head = DAFormerHead(in_channels=(8, 16, 32, 64), channels=16, num_classes=5, dilations=(1, 2, 3))
    mods = head.fuse_layer.aspp_modules
    assert isinstance(mods[0], ConvModule) and mods[0].conv.kernel_size == (1, 1)
    for m, d in zip(mods[1:], (2, 3)):
        assert isinstance(m, DepthwiseSeparableConvModule)
        assert m.depthwise_conv.conv.dilation == (d, d) and m.depthwise_conv.conv.padding == (d, d)
        assert m.depthwise_conv.conv.groups == 64
    assert head.fuse_layer.bottleneck.conv.in_channels == 3 * 16
    emb, logits = head.eval()(_features())
    assert emb.shape == (2, 16, 16, 12)


def test_dropout_only_in_training():
    head = DAFormerHead(in_channels=(8, 16, 32, 64), channels=16, num_classes=5, dropout_ratio=0.5)
    assert isinstance(head.dropout, torch.nn.Dropout2d) and head.dropout.p == 0.5
    assert isinstance(DAFormerHead(in_channels=(8, 16, 32, 64), dropout_ratio=0.0).dropout, torch.nn.Identity)


def test_initialisation():
    g = torch.Generator().manual_seed(0)
    head = DAFormerHead(in_channels=(64, 128, 320, 512), channels=64, num_classes=19, init=False)
    head.init_weights(g)
    w = head.conv_seg.weight
    assert abs(w.std().item() - 0.01) < 0.001 and torch.all(head.conv_seg.bias == 0)
    bott = head.fuse_layer.bottleneck
    fan_out = bott.conv.weight.shape[0] * 9
    assert abs(bott.conv.weight.std().item() - (2 / fan_out) ** 0.5) < 0.1 * (2 / fan_out) ** 0.5
    assert torch.all(bott.bn.weight == 1) and torch.all(bott.bn.bias == 0)
    emb_w = head.embed_layers[3].proj.weight  # PyTorch default: U(+-1/sqrt(fan_in))
    assert emb_w.abs().max().item() <= 1 / 512**0.5 + 1e-7
    other = DAFormerHead(in_channels=(64, 128, 320, 512), channels=64, num_classes=19, init=False)
    other.init_weights(torch.Generator().manual_seed(0))
    for a, b in zip(head.parameters(), other.parameters()):
        assert torch.equal(a, b)

"""fp32 parity of the model against independent implementations.

1. A naive re-implementation of the reference MiT + DAFormer head written here with explicit ops
   (attention as ``softmax(q k^T * scale) v``), reading the same weights: proves that the SDPA path,
   the kv split, the head order and the reshapes equal the reference formulas.
2. Hugging Face ``transformers`` SegformerModel (skipped when not installed): random weights loaded
   into our backbone through the key table give the same hidden states, and a file written in the hub
   layout loads into transformers itself (so the hub names are the real ones).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dida.checkpoint import load_checkpoint
from dida.models import build_mit, build_segmentor
from dida.models.mit_weights import hf_to_mit_state_dict, mit_to_hf_state_dict

pytestmark = pytest.mark.parity


def _ln(x, p, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], p[f"{prefix}.weight"], p[f"{prefix}.bias"], eps)


def _linear(x, p, prefix):
    return x @ p[f"{prefix}.weight"].T + p[f"{prefix}.bias"]


def naive_mit(p: dict, x: torch.Tensor, heads, depths, sr_ratios) -> list[torch.Tensor]:
    """Reference MiT forward (SegFormer ``mix_transformer.py`` semantics) from a state dict."""
    outs = []
    b = x.shape[0]
    for s in range(4):
        k, stride = (7, 4) if s == 0 else (3, 2)
        pe = f"patch_embed{s + 1}"
        x = F.conv2d(x, p[f"{pe}.proj.weight"], p[f"{pe}.proj.bias"], stride, k // 2)
        _, c, h, w = x.shape
        t = _ln(x.flatten(2).transpose(1, 2), p, f"patch_embed{s + 1}.norm", 1e-5)
        nh, d = heads[s], c // heads[s]
        for i in range(depths[s]):
            pre = f"block{s + 1}.{i}"
            y = _ln(t, p, f"{pre}.norm1", 1e-6)
            q = _linear(y, p, f"{pre}.attn.q").reshape(b, h * w, nh, d).permute(0, 2, 1, 3)
            if sr_ratios[s] > 1:
                r = sr_ratios[s]
                m = y.permute(0, 2, 1).reshape(b, c, h, w)
                m = F.conv2d(m, p[f"{pre}.attn.sr.weight"], p[f"{pre}.attn.sr.bias"], stride=r)
                m = _ln(m.reshape(b, c, -1).permute(0, 2, 1), p, f"{pre}.attn.norm", 1e-5)
            else:
                m = y
            kv = _linear(m, p, f"{pre}.attn.kv").reshape(b, -1, 2, nh, d).permute(2, 0, 3, 1, 4)
            attn = (q @ kv[0].transpose(-2, -1)) * d**-0.5
            attn = attn.softmax(dim=-1)
            a = (attn @ kv[1]).transpose(1, 2).reshape(b, h * w, c)
            t = t + _linear(a, p, f"{pre}.attn.proj")
            y = _ln(t, p, f"{pre}.norm2", 1e-6)
            y = _linear(y, p, f"{pre}.mlp.fc1")
            hid = y.shape[-1]
            y = y.transpose(1, 2).view(b, hid, h, w)
            y = F.conv2d(y, p[f"{pre}.mlp.dwconv.dwconv.weight"], p[f"{pre}.mlp.dwconv.dwconv.bias"], 1, 1,
                         groups=hid)
            y = F.gelu(y.flatten(2).transpose(1, 2))
            t = t + _linear(y, p, f"{pre}.mlp.fc2")
        t = _ln(t, p, f"norm{s + 1}", 1e-6)
        x = t.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        outs.append(x)
    return outs


def _bn_relu_conv(x, p, prefix, **conv):
    x = F.conv2d(x, p[f"{prefix}.conv.weight"], None, **conv)
    x = F.batch_norm(x, p[f"{prefix}.bn.running_mean"], p[f"{prefix}.bn.running_var"],
                     p[f"{prefix}.bn.weight"], p[f"{prefix}.bn.bias"], False, 0.0, 1e-5)
    return F.relu(x)


def naive_head(p: dict, feats, dilations) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference DAFormerHead (sepaspp) forward in eval mode from a state dict (``decode_head.`` stripped)."""
    n, _, h, w = feats[0].shape
    cs = []
    for i, f in enumerate(feats):
        e = _linear(f.flatten(2).transpose(1, 2), p, f"embed_layers.{i}.proj")
        e = e.permute(0, 2, 1).reshape(n, -1, f.shape[2], f.shape[3])
        if e.shape[2:] != (h, w):
            e = F.interpolate(e, size=(h, w), mode="bilinear", align_corners=False)
        cs.append(e)
    x = torch.cat(cs, dim=1)
    branches = []
    for j, d in enumerate(dilations):
        pre = f"fuse_layer.aspp_modules.{j}"
        if d == 1:
            branches.append(_bn_relu_conv(x, p, pre))
        else:
            y = _bn_relu_conv(x, p, f"{pre}.depthwise_conv", padding=d, dilation=d, groups=x.shape[1])
            branches.append(_bn_relu_conv(y, p, f"{pre}.pointwise_conv"))
    fused = _bn_relu_conv(torch.cat(branches, dim=1), p, "fuse_layer.bottleneck", padding=1)
    logits = F.conv2d(fused, p["conv_seg.weight"], p["conv_seg.bias"])
    return fused, logits


def test_segmentor_matches_naive_reference():
    torch.manual_seed(0)
    heads, depths, srs = [1, 2, 2, 4], [2, 1, 2, 1], [8, 4, 2, 1]
    model = build_segmentor(
        "mit_b0", 5, embed_dims=[16, 32, 48, 64], num_heads=heads, depths=depths, decoder_channels=24,
        aspp_dilations=(1, 2, 3, 4), generator=torch.Generator().manual_seed(11),
    )
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    model.eval()
    img = torch.randn(2, 3, 72, 88, generator=g)
    sd = model.state_dict()
    bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    hd = {k[len("decode_head."):]: v for k, v in sd.items() if k.startswith("decode_head.")}
    with torch.no_grad():
        out = model(img)
        ref_feats = naive_mit(bb, img, heads, depths, srs)
        ref_emb, ref_logits = naive_head(hd, ref_feats, (1, 2, 3, 4))
    for a, b in zip(out.features, ref_feats):
        print("feature max abs diff", (a - b).abs().max().item())
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    print("logits max abs diff", (out.logits - ref_logits).abs().max().item())
    torch.testing.assert_close(out.embedding, ref_emb, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, ref_logits, atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- transformers


def _hf_b0_config():
    transformers = pytest.importorskip("transformers")
    return transformers, transformers.SegformerConfig(
        num_channels=3, num_encoder_blocks=4, depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1],
        hidden_sizes=[32, 64, 160, 256], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2],
        num_attention_heads=[1, 2, 5, 8], mlp_ratios=[4, 4, 4, 4], hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
    )


def _match_reference_eps(hf_model) -> None:
    """HF uses LayerNorm eps 1e-5 everywhere; the reference MiT uses 1e-6 in blocks and stage outputs."""
    for name, m in hf_model.named_modules():
        excluded = ("patch_embeddings", "sequence_reduction", "attention.self")
        in_block_or_stage = not any(s in name for s in excluded)
        if isinstance(m, torch.nn.LayerNorm) and in_block_or_stage:
            m.eps = 1e-6


def test_hf_segformer_hidden_states_match():
    transformers, config = _hf_b0_config()
    torch.manual_seed(0)
    hf = transformers.SegformerModel(config).eval()
    _match_reference_eps(hf)
    ours = build_mit("mit_b0")
    mit_sd, dropped = hf_to_mit_state_dict(hf.state_dict())
    assert dropped == []
    info = load_checkpoint(ours, mit_sd)
    assert info["format"] == "mit" and info["num_tensors"] == len(ours.state_dict())
    img = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        states = hf(img, output_hidden_states=True).hidden_states
        feats = ours.eval()(img)
    assert len(states) == 4
    for a, b in zip(feats, states):
        diff = (a - b).abs().max().item()
        print("hf hidden state max abs diff", diff)
        assert a.shape == b.shape and diff < 1e-4


def test_hub_layout_file_loads_into_transformers(tmp_path):
    """Our hub-layout names are what transformers itself reads (via its own legacy-name conversion)."""
    transformers, config = _hf_b0_config()
    from safetensors.torch import save_file

    ours = build_mit("mit_b0", init=False)
    ours.init_weights(torch.Generator().manual_seed(3))
    sd = mit_to_hf_state_dict(ours.state_dict(), layout="hub", prefix="")
    config.save_pretrained(tmp_path)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    hf, loading_info = transformers.SegformerModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not loading_info["missing_keys"] and not loading_info["unexpected_keys"]
    _match_reference_eps(hf.eval())
    img = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        states = hf(img, output_hidden_states=True).hidden_states
        feats = ours.eval()(img)
    for a, b in zip(feats, states):
        assert (a - b).abs().max().item() < 1e-4

"""MiT backbone: parameter counts, official key layout, output shapes, init, drop path."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dida.models import MIT_VARIANTS, build_mit, build_segmentor
from dida.models.layers import DropPath, drop_path
from dida.models.mit import BLOCK_LN_EPS, DEFAULT_LN_EPS, MixVisionTransformer

# Spec 1.2 table (backbone parameters, rounded to 0.01 M; b5 exact).
SPEC_PARAMS_M = {"mit_b0": 3.32, "mit_b1": 13.15, "mit_b2": 24.20, "mit_b3": 44.07, "mit_b4": 60.84}
B5_PARAMS = 81_443_008
STUDENT_PARAMS = 85_155_283
HEAD_PARAMS = 3_712_275


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_mit(variant: str) -> MixVisionTransformer:
    with torch.device("meta"):
        return build_mit(variant, init=False)


def _expected_count(variant: str) -> int:
    """Closed-form count from the architecture numbers (independent of the module code)."""
    v = MIT_VARIANTS[variant]
    total, prev = 0, 3
    for s, (c, d, r) in enumerate(zip(v.embed_dims, v.depths, v.sr_ratios)):
        k = 7 if s == 0 else 3
        total += c * prev * k * k + c + 2 * c  # patch embed conv + LN
        block = 2 * c  # norm1
        block += c * c + c + 2 * c * c + 2 * c + c * c + c  # q, kv, proj
        if r > 1:
            block += c * c * r * r + c + 2 * c  # sr conv + its LN
        h = 4 * c
        block += 2 * c + h * c + h + 9 * h + h + c * h + c  # norm2, fc1, dwconv, fc2
        total += d * block + 2 * c  # blocks + stage norm
        prev = c
    return total


@pytest.mark.parametrize("variant", list(MIT_VARIANTS))
def test_parameter_counts(variant):
    n = _count(_meta_mit(variant))
    assert n == _expected_count(variant)
    if variant == "mit_b5":
        assert n == B5_PARAMS
    else:
        assert abs(n / 1e6 - SPEC_PARAMS_M[variant]) <= 0.005 + 1e-9, n


def test_student_parameter_count():
    with torch.device("meta"):
        model = build_segmentor("mit_b5", 19)
    assert _count(model.backbone) == B5_PARAMS
    assert _count(model.decode_head) == HEAD_PARAMS
    assert _count(model) == STUDENT_PARAMS
    assert len(model.backbone.state_dict()) == 1052
    assert len(model.state_dict()) == 1110  # 1052 + 58 head tensors (34 params + 24 BN buffers)


@pytest.mark.parametrize("variant", list(MIT_VARIANTS))
def test_official_key_layout(reference_dir, variant):
    """Names and shapes equal the official ImageNet files minus the classifier; counts from the file."""
    data = json.loads((reference_dir / "keys" / "mit_imagenet_keys.json").read_text())
    ref = {e["key"]: tuple(e["shape"]) for e in data["backbones"][variant]}
    assert {k for k in ref if k.startswith("head.")} == {"head.weight", "head.bias"}
    ref = {k: s for k, s in ref.items() if not k.startswith("head.")}
    ours = {k: tuple(t.shape) for k, t in _meta_mit(variant).state_dict().items()}
    assert ours == ref
    assert sum(math.prod(s) for s in ref.values()) == _count(_meta_mit(variant))


def test_checkpoint_layout_keys(reference_dir):
    data = json.loads((reference_dir / "keys" / "dida_daformer_mitb5_checkpoint_layout.json").read_text())
    ref = {e["key"]: tuple(e["shape"]) for e in data["segmentor_keys"]}
    with torch.device("meta"):
        model = build_segmentor("mit_b5", 19)
    assert {k: tuple(t.shape) for k, t in model.state_dict().items()} == ref


def test_output_shapes_and_strides(tiny_model_kwargs):
    kw = {k: tiny_model_kwargs[k] for k in ("embed_dims", "num_heads", "depths")}
    mit = build_mit("mit_b0", **kw).eval()
    for h, w in [(64, 64), (64, 96), (70, 45)]:
        outs = mit(torch.randn(2, 3, h, w))
        assert len(outs) == 4
        for s, (out, c) in enumerate(zip(outs, kw["embed_dims"])):
            stride = 4 * 2**s
            # each strided conv rounds up: ceil(ceil(h / 4) / 2) ...
            eh, ew = math.ceil(h / 4), math.ceil(w / 4)
            for _ in range(s):
                eh, ew = math.ceil(eh / 2), math.ceil(ew / 2)
            assert out.shape == (2, c, eh, ew), (s, stride, out.shape)
            assert out.is_contiguous()
        assert all(torch.isfinite(o).all() for o in outs)


def test_layernorm_eps_and_structure():
    mit = build_mit("mit_b0", depths=[1, 1, 1, 1], init=False)
    assert mit.patch_embed1.norm.eps == DEFAULT_LN_EPS
    assert mit.patch_embed1.proj.kernel_size == (7, 7) and mit.patch_embed1.proj.stride == (4, 4)
    assert mit.patch_embed2.proj.kernel_size == (3, 3) and mit.patch_embed2.proj.stride == (2, 2)
    blk = mit.block1[0]
    assert blk.norm1.eps == BLOCK_LN_EPS and blk.norm2.eps == BLOCK_LN_EPS
    assert blk.attn.norm.eps == DEFAULT_LN_EPS
    assert blk.attn.sr.kernel_size == (8, 8)
    assert not hasattr(mit.block4[0].attn, "sr")
    assert mit.norm4.eps == BLOCK_LN_EPS
    assert blk.mlp.dwconv.dwconv.groups == blk.mlp.dwconv.dwconv.in_channels
    assert isinstance(blk.mlp.act, torch.nn.GELU) and blk.mlp.act.approximate == "none"


def test_drop_path_rates_linear_over_all_blocks():
    with torch.device("meta"):
        mit = build_mit("mit_b5", drop_path_rate=0.1, init=False)
    blocks = [b for s in range(1, 5) for b in getattr(mit, f"block{s}")]
    assert len(blocks) == 52
    rates = [b.drop_path.p if isinstance(b.drop_path, DropPath) else 0.0 for b in blocks]
    assert rates[0] == 0.0 and isinstance(blocks[0].drop_path, torch.nn.Identity)
    for j, r in enumerate(rates):
        assert r == pytest.approx(0.1 * j / 51, abs=1e-7)


def test_drop_path_per_sample():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 2)
    y = drop_path(x, 0.25, training=True)
    per_sample = y.flatten(1)
    # each sample is either all zeros or all 1/(1-p)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1))
    kept = (per_sample[:, 0] != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.03
    assert torch.equal(drop_path(x, 0.25, training=False), x)


def test_init_statistics():
    g = torch.Generator().manual_seed(0)
    mit = build_mit("mit_b0", init=False)
    mit.init_weights(g)
    fc1 = mit.block3[0].mlp.fc1
    assert abs(fc1.weight.std().item() - 0.02) < 0.002 and torch.all(fc1.bias == 0)
    assert fc1.weight.abs().max().item() <= 2.0
    conv = mit.patch_embed1.proj  # fan_out = 7*7*32
    assert abs(conv.weight.std().item() - math.sqrt(2 / (49 * 32))) < 0.01 * 2
    dw = mit.block1[0].mlp.dwconv.dwconv  # groups: fan_out = 9 * 4C / 4C = 9
    assert abs(dw.weight.std().item() - math.sqrt(2 / 9)) < 0.05
    assert torch.all(mit.norm1.weight == 1) and torch.all(mit.norm1.bias == 0)
    # same generator seed -> same weights
    other = build_mit("mit_b0", init=False)
    other.init_weights(torch.Generator().manual_seed(0))
    for a, b in zip(mit.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_channels_last_input(tiny_model_kwargs):
    kw = {k: tiny_model_kwargs[k] for k in ("embed_dims", "num_heads", "depths")}
    mit = build_mit("mit_b0", **kw).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = mit(x)
        b = mit(x.to(memory_format=torch.channels_last))
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


def test_bad_stage_arguments():
    with pytest.raises(ValueError, match="4 stages"):
        MixVisionTransformer(depths=(1, 1, 1))
    with pytest.raises(ValueError, match="divisible"):
        build_mit("mit_b0", embed_dims=[8, 16, 30, 64], num_heads=[1, 1, 4, 1])
    with pytest.raises(ValueError, match="unknown backbone"):
        build_mit("mit_b9")


@pytest.mark.slow
def test_mit_b5_real_forward_shapes():
    """Spec 1.2: stage outputs of a 512x512 input (full-size model, CPU; slow)."""
    mit = build_mit("mit_b5", init=False).eval()
    with torch.no_grad():
        outs = mit(torch.randn(1, 3, 512, 512))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 128, 128), (1, 128, 64, 64), (1, 320, 32, 32),
                                              (1, 512, 16, 16)]

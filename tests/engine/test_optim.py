from __future__ import annotations

import pytest
import torch

from dida.engine.optim import build_optimizer, param_group_settings, poly_warmup_lr, set_learning_rates

SCHED = dict(max_iters=40000, warmup_iters=1500, warmup_ratio=1e-6, power=1.0)


@pytest.mark.parametrize(
    "it, expected",
    [
        (0, 6e-5 * 1e-6),  # warm-up starts at base * warmup_ratio
        (750, 6e-5 * (1 - 750 / 40000) * (1 - 0.5 * (1 - 1e-6))),
        (1499, 6e-5 * (1 - 1499 / 40000) * (1 - (1 / 1500) * (1 - 1e-6))),
        (1500, 6e-5 * (1 - 1500 / 40000)),  # 5.775e-5, warm-up over
        (20000, 3e-5),
        (39999, 6e-5 / 40000),
    ],
)
def test_poly10warm_matches_the_reference(it, expected):
    assert poly_warmup_lr(6e-5, it, **SCHED) == pytest.approx(expected, rel=1e-12)


def test_param_rules_follow_mmcv_custom_keys():
    kw = dict(head_lr_mult=10.0, norm_decay_mult=0.0)
    assert param_group_settings("decode_head.conv_seg.weight", **kw) == (10.0, 1.0)
    assert param_group_settings("decode_head.fuse_layer.bottleneck.bn.weight", **kw) == (10.0, 1.0)
    assert param_group_settings("backbone.block1.0.norm1.weight", **kw) == (1.0, 0.0)
    assert param_group_settings("backbone.patch_embed1.norm.bias", **kw) == (1.0, 0.0)
    assert param_group_settings("backbone.block3.7.attn.norm.weight", **kw) == (1.0, 0.0)
    assert param_group_settings("backbone.block1.0.attn.q.bias", **kw) == (1.0, 1.0)


def test_optimizer_groups_and_lrs():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.ModuleDict({"fc": torch.nn.Linear(2, 2), "norm1": torch.nn.LayerNorm(2)})
            self.decode_head = torch.nn.Linear(2, 2)

    opt = build_optimizer(M().named_parameters(), lr=6e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                          head_lr_mult=10.0, norm_decay_mult=0.0, layer_decay=1.0, backbone=None)
    got = sorted((round(g["base_lr"], 12), g["weight_decay"], len(g["params"])) for g in opt.param_groups)
    assert got == [(6e-5, 0.0, 2), (6e-5, 0.01, 2), (6e-4, 0.01, 2)]
    lr = set_learning_rates(opt, 1500, **SCHED)
    assert lr == pytest.approx(5.775e-5)
    assert max(g["lr"] for g in opt.param_groups) == pytest.approx(5.775e-4)

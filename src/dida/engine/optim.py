"""AdamW with the reference's parameter-wise rules and the ``poly10warm`` learning-rate schedule.

Reference (spec section 7): mmcv ``custom_keys`` matched as substrings of the full parameter name,
longest key first (ties alphabetical), first match wins: ``head`` -> lr x10 (every ``decode_head.*``
parameter, its BatchNorm included, keeps weight decay), ``norm`` -> weight decay x0 (all backbone
LayerNorms). The reference builds one group per parameter; grouping parameters with equal settings
gives identical updates.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def param_group_settings(name: str, *, head_lr_mult: float, norm_decay_mult: float) -> tuple[float, float]:
    """Return ``(lr_mult, decay_mult)`` for one parameter name, mmcv ``custom_keys`` semantics."""
    custom = {"pos_block": (1.0, 0.0), "head": (head_lr_mult, 1.0), "norm": (1.0, norm_decay_mult)}
    for key in sorted(sorted(custom), key=len, reverse=True):
        if key in name:
            return custom[key]
    return 1.0, 1.0


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    head_lr_mult: float,
    norm_decay_mult: float,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, grouped by (lr_mult, decay_mult); ``base_lr`` kept per group."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        key = param_group_settings(name, head_lr_mult=head_lr_mult, norm_decay_mult=norm_decay_mult)
        groups.setdefault(key, []).append(p)
    param_groups = [
        {"params": ps, "lr": lr * lm, "base_lr": lr * lm, "weight_decay": weight_decay * dm}
        for (lm, dm), ps in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def poly_warmup_lr(
    base_lr: float,
    it: int,
    *,
    max_iters: int,
    warmup_iters: int,
    warmup_ratio: float,
    power: float = 1.0,
    min_lr: float = 0.0,
) -> float:
    """Learning rate at iteration ``it`` (0-based, computed before the iteration), mmcv semantics.

    poly: ``(base - min_lr) * (1 - it / max_iters) ** power + min_lr``; for ``it < warmup_iters`` a linear
    warm-up multiplies it by ``1 - (1 - it / warmup_iters) * (1 - warmup_ratio)``.
    """
    progress = min(it, max_iters) / max(max_iters, 1)
    lr = (base_lr - min_lr) * (1.0 - progress) ** power + min_lr
    if it < warmup_iters:
        k = (1.0 - it / warmup_iters) * (1.0 - warmup_ratio)
        lr = lr * (1.0 - k)
    return lr


def set_learning_rates(optimizer: torch.optim.Optimizer, it: int, **schedule: float) -> float:
    """Set every group's lr for iteration ``it``; returns the lr of the group with multiplier 1."""
    lrs = []
    for g in optimizer.param_groups:
        g["lr"] = poly_warmup_lr(g["base_lr"], it, **schedule)  # type: ignore[arg-type]
        lrs.append(g["lr"])
    return min(lrs)

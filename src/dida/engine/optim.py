"""AdamW with the reference's parameter-wise rules and the ``poly10warm`` learning-rate schedule.

Reference (spec section 7): mmcv ``custom_keys`` matched as substrings of the full parameter name,
longest key first (ties alphabetical), first match wins: ``head`` -> lr x10 (every ``decode_head.*``
parameter, its BatchNorm included, keeps weight decay), ``norm`` -> weight decay x0 (all backbone
LayerNorms). The reference builds one group per parameter; grouping parameters with equal settings
gives identical updates.

Foundation ViTs add two rules (keys that no MiT / DAFormer-head name contains, so the reference's groups are
unchanged): their CLS / register / mask tokens and position embeddings get no weight decay (BEiT, DINOv2
fine-tuning), and ``layer_decay`` < 1 scales each backbone parameter's lr by ``layer_decay ** (L + 1 - id)``
with ``id = backbone.layer_id(name)`` (BEiT's layer-wise decay: patch embeddings 0, block i -> i, the rest
L + 1, i.e. not decayed; parameters outside the backbone, the head, are not decayed either).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# Substrings (mmcv custom_keys) -> (lr_mult, decay_mult) besides the head/norm rules.
_NO_DECAY_KEYS = ("pos_block", "cls_token", "register_tokens", "mask_token", "position_embeddings")


def param_group_settings(name: str, *, head_lr_mult: float, norm_decay_mult: float) -> tuple[float, float]:
    """Return ``(lr_mult, decay_mult)`` for one parameter name, mmcv ``custom_keys`` semantics."""
    custom = {**dict.fromkeys(_NO_DECAY_KEYS, (1.0, 0.0)), "head": (head_lr_mult, 1.0),
              "norm": (1.0, norm_decay_mult)}
    for key in sorted(sorted(custom), key=len, reverse=True):
        if key in name:
            return custom[key]
    return 1.0, 1.0


def layer_lr_scales(backbone: nn.Module | None, layer_decay: float) -> dict[int, float]:
    """``id(parameter) -> layer_decay ** (L + 1 - backbone.layer_id(name))`` ({} when ``layer_decay`` is 1).

    Raises:
        ValueError: ``layer_decay`` < 1 with a backbone that does not number its layers.
    """
    if layer_decay == 1.0:
        return {}
    layer_id = getattr(backbone, "layer_id", None)
    num_layers = getattr(backbone, "num_layers", None)
    if backbone is None or not callable(layer_id) or not isinstance(num_layers, int):
        raise ValueError(f"optim.layer_decay={layer_decay} needs a backbone that numbers its layers "
                         f"(layer_id, num_layers: the foundation ViTs); {type(backbone).__name__} does not")
    return {id(p): layer_decay ** (num_layers + 1 - layer_id(n)) for n, p in backbone.named_parameters()}


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    head_lr_mult: float,
    norm_decay_mult: float,
    layer_decay: float,
    backbone: nn.Module | None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, grouped by (lr_mult, decay_mult); ``base_lr`` and ``lr_mult``
    kept per group. ``backbone`` (the module holding some of ``named_params``) is read for ``layer_decay``."""
    scales = layer_lr_scales(backbone, layer_decay)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        lm, dm = param_group_settings(name, head_lr_mult=head_lr_mult, norm_decay_mult=norm_decay_mult)
        groups.setdefault((lm * scales.get(id(p), 1.0), dm), []).append(p)
    param_groups = [
        {"params": ps, "lr": lr * lm, "base_lr": lr * lm, "lr_mult": lm, "weight_decay": weight_decay * dm}
        for (lm, dm), ps in sorted(groups.items())
    ]
    # On CUDA the fused kernel updates every parameter in a few launches (the step is launch-bound at batch 2);
    # elsewhere PyTorch's default implementation. Same update rule either way.
    cuda = all(p.is_cuda for g in param_groups for p in g["params"]) and any(g["params"] for g in param_groups)
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=True if cuda else None)


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
    """Set every group's lr for iteration ``it``; returns the lr of the group with multiplier 1 (the
    smallest lr when no group has one, e.g. an optimizer state written before ``lr_mult`` was stored)."""
    lrs, base = [], []
    for g in optimizer.param_groups:
        g["lr"] = poly_warmup_lr(g["base_lr"], it, **schedule)  # type: ignore[arg-type]
        lrs.append(g["lr"])
        if g.get("lr_mult") == 1.0:
            base.append(g["lr"])
    return min(base or lrs)

"""The learning rate a training run uses at each iteration: poly10warm at the 0-based iteration index.

Spec 7: "Schedule poly10warm (mmcv LrUpdaterHook, by iteration, computed before each iteration with
t = runner.iter starting at 0, per group base lr b): poly(t) = b (1 - t/max_iters)^1.0, min_lr 0. For
t < warmup_iters: lr = poly(t) [1 - (1 - t/warmup_iters)(1 - warmup_ratio)]. At t = 0 this gives
b 1e-6." The metrics row of iteration i (1-based, as logged) must carry the lr of t = i - 1.
"""

from __future__ import annotations

import json

import pytest

from dida.config import load_config
from dida.engine.optim import poly_warmup_lr
from dida.engine.train import train


def spec_lr(b: float, t: int, *, max_iters: int, warmup_iters: int, warmup_ratio: float) -> float:
    """poly10warm written out from the spec (power 1, min_lr 0)."""
    lr = b * (1.0 - t / max_iters) ** 1.0
    if t < warmup_iters:
        lr *= 1.0 - (1.0 - t / warmup_iters) * (1.0 - warmup_ratio)
    return lr


def test_logged_lr_is_poly10warm_at_the_zero_based_iteration(fake_data, tmp_path):
    data = fake_data / "tiny_cpu"
    cfg = load_config("tiny_cpu", [f"run.dir={tmp_path / 'run'}", f"data.source.root={data / 'gta'}",
                                   f"data.target.root={data / 'cs'}", f"data.val.root={data / 'cs'}",
                                   "train.max_iters=2", "train.log_interval=1", "train.checkpoint_interval=0",
                                   "train.eval_interval=0"])
    o = cfg.optim
    assert (o.power, o.min_lr) == (1.0, 0.0) and o.warmup_iters > 2  # both iterations are in the warm-up
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [1, 2]
    sched = {"max_iters": 2, "warmup_iters": o.warmup_iters, "warmup_ratio": o.warmup_ratio}
    for row, t in zip(rows, (0, 1)):
        expected = spec_lr(o.lr, t, **sched)
        assert poly_warmup_lr(o.lr, t, **sched, power=1.0, min_lr=0.0) == pytest.approx(expected, rel=1e-12)
        # The logged lr is the one of the groups with multiplier 1 (the head's is 10x).
        assert row["lr"] == pytest.approx(expected, rel=1e-12), f"iteration {row['iter']} should use t={t}"
    # t = 0 is base * warmup_ratio (spec: "At t = 0 this gives b 1e-6"); a 1-based t would be ~1e5 larger.
    assert rows[0]["lr"] == pytest.approx(o.lr * o.warmup_ratio, rel=1e-12)
    assert rows[1]["lr"] > 1e3 * rows[0]["lr"]

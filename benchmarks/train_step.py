"""Training-step cost: DAFormer step vs DIDA step (same model, same batch), ms/iteration and peak memory.

    python -m benchmarks.train_step [--backbone mit_b0] [--size 256] [--batch 2] [--iters 5]
                                    [--device cpu|cuda] [--amp off|bf16] [--channels-last] [--compile]

For each variant the student, EMA teacher, frozen ImageNet model and instance bank are built like
``dida.engine.train.build_training_state`` does from ``dida.config`` defaults (same seed, so the same initial
weights), with AdamW from ``dida.engine.optim``; the step is ``dida.uda.step.build_step`` and one timed
iteration is what the training loop does: zero_grad, the step with per-stage backward, optimizer step.

Variants:
- ``daformer``: DACS + ImageNet feature distance (the default terms).
- ``dida``: ``uda.dual_level.enabled=true`` with ``InstanceBank.random(300, D, 19)``, at iterations where the bank
  is not updated (49 of 50 with the default ``bank.update_interval=50``).
- ``dida (bank update every step)``: the same with ``bank.update_interval=1`` (worst case).

Iterations run round-robin over the variants (a change of machine load hits all alike); the steps are
numbered from 1 (EMA update, not the step-0 initialisation). Batch: random normalised images and
block labels (32x32-pixel cells, so the feature distance's thing mask is not empty).

Peak memory: on CUDA ``max_memory_allocated`` during the variant's iterations above what was allocated
before them (activations, gradients, transients); on CPU each variant runs 2 iterations in a fresh
subprocess and the increase of the maximum RSS over its value once the models exist is reported
(includes the AdamW moments, allocated at the first iteration).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from benchmarks._common import (
    add_common_args,
    cuda_peak,
    machine_description,
    max_rss_bytes,
    median,
    print_table,
    run_child,
    setup_threads,
    sync,
    time_interleaved,
)

VARIANTS = {
    "daformer": dict(method="daformer", bank_interval=50),
    "dida": dict(method="dida", bank_interval=50),
    "dida (bank update every step)": dict(method="dida", bank_interval=1),
}
KEYS = {"daformer": "daformer", "dida": "dida", "dida-bank": "dida (bank update every step)"}


def make_batch(batch: int, size: int, num_classes: int, device: torch.device,
               seed: int = 0) -> dict[str, Any]:
    """Random normalised source/target images ``[B, 3, S, S]`` and block labels ``[B, S, S]``."""
    g = torch.Generator().manual_seed(seed)
    cells = max(1, size // 32)
    lab = torch.randint(0, num_classes, (batch, cells, cells), generator=g)
    lab = lab.repeat_interleave(size // cells, 1).repeat_interleave(size // cells, 2)
    return {
        "img": torch.randn(batch, 3, size, size, generator=g).to(device),
        "label": lab.to(device),
        "target_img": torch.randn(batch, 3, size, size, generator=g).to(device),
    }


class Trainer:
    """One variant: models, optimizer and step, built like the engine does."""

    def __init__(self, args: argparse.Namespace, method: str, bank_interval: int,
                 device: torch.device) -> None:
        from dida.config import Config
        from dida.engine.train import build_training_state
        from dida.uda.step import build_step

        cfg = Config()
        cfg.model.backbone = args.backbone
        cfg.uda.dual_level.enabled = method == "dida"
        cfg.uda.bank.init = "random"
        cfg.uda.bank.size = args.bank_size
        cfg.uda.bank.update_interval = bank_interval
        cfg.uda.dual_level.chunk_rows = args.chunk_rows
        cfg.train.channels_last = args.channels_last
        torch.manual_seed(0)  # same initial weights for every variant
        state = build_training_state(cfg, device)
        self.student, self.teacher, self.optimizer = state.student, state.teacher, state.optimizer
        step_model = torch.compile(self.student) if args.compile else self.student
        self.step = build_step(cfg.uda, student=step_model, teacher=self.teacher, terms=state.terms, amp=args.amp,
                               device_type=device.type)
        self.generator = torch.Generator()
        self.it = 1
        self.student.train()

    def __call__(self, batch: dict[str, Any]) -> None:
        torch.manual_seed(self.it)
        self.generator.manual_seed(self.it + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.step(batch, self.it, generator=self.generator, backward=lambda loss: loss.backward())
        self.optimizer.step()
        self.it += 1
        if self.it % 50 == 0:  # keep clear of the bank schedule's step (except for interval 1)
            self.it += 1


def count_host_syncs(fn: Any) -> int:
    """Number of synchronising CUDA calls during ``fn()`` (``torch.cuda.set_sync_debug_mode``)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def _channels_last_batch(batch: dict[str, Any]) -> dict[str, Any]:
    cl = torch.channels_last
    return {k: v.contiguous(memory_format=cl) if v.dim() == 4 else v for k, v in batch.items()}


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """CPU memory of one variant in this fresh process: max-RSS increase over 2 iterations."""
    device = torch.device(args.device)
    spec = VARIANTS[KEYS[args.child]]
    batch = make_batch(args.batch, args.size, 19, device)
    if args.channels_last:
        batch = _channels_last_batch(batch)
    trainer = Trainer(args, spec["method"], spec["bank_interval"], device)
    base = max_rss_bytes()
    for _ in range(2):
        trainer(batch)
    return {"peak_bytes": max_rss_bytes() - base}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--backbone", default=None, help="default mit_b0 on cpu, mit_b5 on cuda")
    p.add_argument("--size", type=int, default=None, help="crop size S (S x S); default 256 cpu, 512 cuda")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=5, help="timed iterations per variant")
    p.add_argument("--bank-size", type=int, default=300)
    p.add_argument("--chunk-rows", type=int, default=64, help="uda.dual_level.chunk_rows")
    p.add_argument("--channels-last", action="store_true", help="student and batch in channels-last")
    p.add_argument("--compile", action="store_true", help="torch.compile the student (as train.compile)")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory subprocesses")
    p.add_argument("--total-iters", type=int, default=40000, help="for the run-time estimate")
    p.add_argument("--child", choices=tuple(KEYS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.backbone = args.backbone or ("mit_b5" if cuda else "mit_b0")
    args.size = args.size or (512 if cuda else 256)
    threads = setup_threads(args.threads)
    if args.child:
        print(json.dumps(_child(args)))
        return 0

    device = torch.device(args.device)
    peaks: dict[str, int | None] = {}
    syncs: dict[str, int] = {}
    if not cuda:
        # First, while this process is small: Linux keeps a process's maximum RSS across fork+exec,
        # so a child started by a large parent would inherit the parent's peak.
        for key, name in KEYS.items():
            if args.no_memory:
                peaks[name] = None
                continue
            child = ["--child", key, "--device", args.device, "--amp", args.amp, "--threads", str(threads),
                     "--backbone", args.backbone, "--size", str(args.size), "--batch", str(args.batch),
                     "--bank-size", str(args.bank_size), "--chunk-rows", str(args.chunk_rows)]
            if args.channels_last:
                child.append("--channels-last")
            if args.compile:
                child.append("--compile")
            peaks[name] = run_child("benchmarks.train_step", child)["peak_bytes"]
    batch = make_batch(args.batch, args.size, 19, device)
    if args.channels_last:
        batch = _channels_last_batch(batch)
    trainers = {name: Trainer(args, spec["method"], spec["bank_interval"], device)
                for name, spec in VARIANTS.items()}

    if cuda:
        # warm-up, then one iteration per variant under the peak-memory counter
        for name, tr in trainers.items():
            for _ in range(args.warmup):
                tr(batch)
            with cuda_peak(device) as box:
                tr(batch)
            peaks[name] = box["peak_bytes"]
        times = time_interleaved({k: (lambda tr=tr: tr(batch)) for k, tr in trainers.items()}, device,
                                 args.iters, warmup=0)
        syncs = {name: count_host_syncs(lambda tr=tr: tr(batch)) for name, tr in trainers.items()}
    else:
        times = time_interleaved({k: (lambda tr=tr: tr(batch)) for k, tr in trainers.items()}, device,
                                 args.iters, warmup=args.warmup)
    sync(device)

    med = {k: median(v) for k, v in times.items()}
    base = med["daformer"]
    rows = []
    for name, t in med.items():
        peak = peaks.get(name)
        rows.append([
            name, f"{1000 * t:.0f}", f"{min(times[name]) * 1000:.0f}-{max(times[name]) * 1000:.0f}",
            f"{t / base:.3f}x", "n/a" if peak is None else f"{peak / 2**20:.0f}",
            f"{t * args.total_iters / 3600:.1f}",
        ])
    mem = "CUDA max_memory_allocated above resident" if cuda else "max RSS increase, fresh process"
    print(machine_description(device))
    print_table(
        f"Training step, {args.backbone} + DAFormer head, batch {args.batch} x {args.size}x{args.size}, "
        f"{args.device}, amp={args.amp}, {threads} threads, channels_last={args.channels_last}, "
        f"compile={args.compile}, chunk_rows={args.chunk_rows}, median of {args.iters} "
        f"(round-robin, {args.warmup} warm-up)",
        ["step", "ms/iter", "range ms", "vs daformer", f"peak MiB ({mem})",
         f"h per {args.total_iters // 1000}k iters"],
        rows,
        [f"DIDA / DAFormer: {med['dida'] / base:.3f}x (goal <= 1.15x); amortised with the bank update every "
         f"50 iterations: {(49 * med['dida'] + med['dida (bank update every step)']) / 50 / base:.3f}x"]
        + (["synchronising CUDA calls in one iteration (set_sync_debug_mode): "
            + ", ".join(f"{k} {v}" for k, v in syncs.items())] if syncs else []),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

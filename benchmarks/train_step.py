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

With ``--matrix``: DAFormer, DIDA and DAFormer + MIC, each in float32, bf16 autocast and compiled
(``train.compile``'s in-place ``torch.compile`` of student, teacher and frozen models, in float32;
``--compile-backend aot_eager`` traces without code generation, which on a CPU takes minutes), side by side.
On CUDA a "GPU busy" column gives the kernels' time in one iteration (``torch.profiler``) next to the wall time:
their difference is the host's launch overhead.

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
MATRIX_METHODS = {"daformer": "daformer", "dida": "dida", "mic": "daformer + mic"}
MATRIX_MODES = ("fp32", "bf16", "compiled")


def matrix_variants() -> dict[str, dict[str, Any]]:
    """``--matrix``: every method in every numeric mode."""
    return {f"{title} {mode}": dict(method=method, bank_interval=50, mode=mode)
            for method, title in MATRIX_METHODS.items() for mode in MATRIX_MODES}


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
                 device: torch.device, mode: str | None = None) -> None:
        from dida.config import Config
        from dida.engine.train import build_training_state
        from dida.runtime import compile_models
        from dida.uda.step import build_step

        cfg = Config()
        cfg.model.backbone = args.backbone
        cfg.uda.dual_level.enabled = method == "dida"
        cfg.uda.mic.enabled = method == "mic"
        cfg.uda.mic.block_size = max(1, args.size // 16)  # 16 blocks per side, as the reference's 32 of 512
        cfg.uda.bank.init = "random"
        cfg.uda.bank.size = args.bank_size
        cfg.uda.bank.update_interval = bank_interval
        cfg.uda.dual_level.chunk_rows = args.chunk_rows
        cfg.train.channels_last = args.channels_last
        torch.manual_seed(0)  # same initial weights for every variant
        state = build_training_state(cfg, device)
        self.student, self.teacher, self.optimizer = state.student, state.teacher, state.optimizer
        compiled = args.compile if mode is None else mode == "compiled"
        if compiled:
            for module in (state.student, state.teacher, *state.terms.values()):
                compile_models(module, backend=args.compile_backend, mode=None)
        amp = args.amp if mode is None else ("bf16" if mode == "bf16" else "off")
        self.step = build_step(cfg.uda, student=self.student, teacher=self.teacher, terms=state.terms, amp=amp,
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


def _variants(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return matrix_variants() if args.matrix else VARIANTS


def _trainer(args: argparse.Namespace, spec: dict[str, Any], device: torch.device) -> Trainer:
    return Trainer(args, spec["method"], spec["bank_interval"], device, spec.get("mode"))


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """CPU memory of one variant in this fresh process: max-RSS increase over 2 iterations."""
    device = torch.device(args.device)
    spec = list(_variants(args).values())[args.child]
    batch = make_batch(args.batch, args.size, 19, device)
    if args.channels_last:
        batch = _channels_last_batch(batch)
    trainer = _trainer(args, spec, device)
    base = max_rss_bytes()
    for _ in range(2):
        trainer(batch)
    return {"peak_bytes": max_rss_bytes() - base}


def _cpu_peaks(args: argparse.Namespace, threads: int) -> dict[str, int | None]:
    """Each variant's peak in a fresh subprocess (run first, while this process is small: Linux keeps a
    process's maximum RSS across fork+exec, so a child of a large parent would inherit its peak)."""
    peaks: dict[str, int | None] = {}
    for index, name in enumerate(_variants(args)):
        if args.no_memory:
            peaks[name] = None
            continue
        child = ["--child", str(index), "--device", args.device, "--amp", args.amp, "--threads", str(threads),
                 "--backbone", args.backbone, "--size", str(args.size), "--batch", str(args.batch),
                 "--bank-size", str(args.bank_size), "--chunk-rows", str(args.chunk_rows),
                 "--compile-backend", args.compile_backend]
        child += [flag for flag, on in (("--channels-last", args.channels_last), ("--compile", args.compile),
                                        ("--matrix", args.matrix)) if on]
        peaks[name] = run_child("benchmarks.train_step", child)["peak_bytes"]
    return peaks


def gpu_busy_seconds(fn: Any) -> float:
    """Seconds the GPU spends in kernels during ``fn()`` (``torch.profiler``, CUDA activity only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6


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
    p.add_argument("--compile", action="store_true",
                   help="torch.compile student, teacher and frozen models (as train.compile)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    p.add_argument("--matrix", action="store_true",
                   help="DAFormer / DIDA / MIC x float32 / bf16 / compiled, side by side (see the module docstring)")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory subprocesses")
    p.add_argument("--total-iters", type=int, default=40000, help="for the run-time estimate")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.backbone = args.backbone or ("mit_b5" if cuda else "mit_b0")
    args.size = args.size or (512 if cuda else 256)
    threads = setup_threads(args.threads)
    if args.child is not None:
        print(json.dumps(_child(args)))
        return 0

    device = torch.device(args.device)
    peaks = {} if cuda else _cpu_peaks(args, threads)
    syncs: dict[str, int] = {}
    busy: dict[str, float] = {}
    batch = make_batch(args.batch, args.size, 19, device)
    if args.channels_last:
        batch = _channels_last_batch(batch)
    trainers = {name: _trainer(args, spec, device) for name, spec in _variants(args).items()}

    if cuda:
        # warm-up, then one iteration per variant under the peak-memory counter and the profiler
        for name, tr in trainers.items():
            for _ in range(args.warmup):
                tr(batch)
            with cuda_peak(device) as box:
                tr(batch)
            peaks[name] = box["peak_bytes"]
            busy[name] = gpu_busy_seconds(lambda tr=tr: tr(batch))
        times = time_interleaved({k: (lambda tr=tr: tr(batch)) for k, tr in trainers.items()}, device,
                                 args.iters, warmup=0)
        syncs = {name: count_host_syncs(lambda tr=tr: tr(batch)) for name, tr in trainers.items()}
    else:
        times = time_interleaved({k: (lambda tr=tr: tr(batch)) for k, tr in trainers.items()}, device,
                                 args.iters, warmup=args.warmup)
    sync(device)
    _report(args, device, threads, times, peaks, busy, syncs)
    return 0


def _report(args: argparse.Namespace, device: torch.device, threads: int, times: dict[str, list[float]],
            peaks: dict[str, int | None], busy: dict[str, float], syncs: dict[str, int]) -> None:
    cuda = device.type == "cuda"
    med = {k: median(v) for k, v in times.items()}
    base = med[next(iter(med))]
    rows = []
    for name, t in med.items():
        peak = peaks.get(name)
        rows.append([
            name, f"{1000 * t:.0f}", f"{min(times[name]) * 1000:.0f}-{max(times[name]) * 1000:.0f}",
            f"{t / base:.3f}x", f"{1000 * busy[name]:.0f}" if name in busy else "n/a",
            "n/a" if peak is None else f"{peak / 2**20:.0f}", f"{t * args.total_iters / 3600:.1f}",
        ])
    mem = "CUDA max_memory_allocated above resident" if cuda else "max RSS increase, fresh process"
    notes = []
    if not args.matrix:
        notes.append(f"DIDA / DAFormer: {med['dida'] / base:.3f}x (goal <= 1.15x); amortised with the bank update "
                     f"every 50 iterations: {(49 * med['dida'] + med['dida (bank update every step)']) / 50 / base:.3f}x")
    if syncs:
        notes.append("synchronising CUDA calls in one iteration (set_sync_debug_mode): "
                     + ", ".join(f"{k} {v}" for k, v in syncs.items()))
    print(machine_description(device))
    print_table(
        f"Training step, {args.backbone}, batch {args.batch} x {args.size}x{args.size}, {args.device}, "
        + ("float32 / bf16 / compiled per row" if args.matrix else f"amp={args.amp}, compile={args.compile}")
        + f" (backend {args.compile_backend}), {threads} threads, channels_last={args.channels_last}, "
        f"chunk_rows={args.chunk_rows}, median of {args.iters} (round-robin, {args.warmup} warm-up)",
        ["step", "ms/iter", "range ms", f"vs {next(iter(med))}", "GPU busy ms", f"peak MiB ({mem})",
         f"h per {args.total_iters // 1000}k iters"],
        rows, notes,
    )


if __name__ == "__main__":
    raise SystemExit(main())

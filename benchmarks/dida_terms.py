"""Time and peak memory of DIDA's bank update and instance term: reference way vs memory-bounded way.

Usage::

    python -m benchmarks.dida_terms [--size 512] [--k 300] [--batch 2] [--device cpu|cuda]

Variants (each run in a fresh subprocess so that peak memory is its own):

- ``update/direct``: upsample the 1/4-resolution embedding to the crop size (``[B, D, H, W]``) and
  average it per class there, the reference way.
- ``update/lowres``: ``InstanceBank.update`` on the low-resolution embedding (class masks pulled back
  through the transposed interpolation; same result).
- ``instance/direct``: similarities + calibration + instance loss, forward and backward, with every
  map upsampled to ``H x W`` first (``chunk_rows=0``, the reference way).
- ``instance/chunked``: the same loss from low-resolution similarities, upsampled chunk by chunk of
  rows with a closed-form gradient (``chunk_rows``, default 64).

Peak memory: CUDA ``max_memory_allocated`` above what the inputs hold; on CPU the increase of the
process's maximum resident set size (``ru_maxrss``) over its value once the inputs exist (glibc's
mmap threshold is fixed at 1 MiB in the child so that freed tensors leave the resident set).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("update/direct", "update/lowres", "instance/direct", "instance/chunked")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_variant(args: argparse.Namespace) -> dict:
    from dida.models.ops import resize
    from dida.uda.dual_level import instance_term
    from dida.uda.instance_bank import InstanceBank

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    size, h = args.size, args.size // 4
    d, c, b = args.dim, args.classes, args.batch
    bank = InstanceBank.random(args.k, d, c, generator=g).to(device)
    e_w = torch.rand(b, d, h, h, generator=g).to(device)
    e_s = torch.rand(b, d, h, h, generator=g).to(device).requires_grad_(True)
    z = (torch.rand(b, c, h, h, generator=g) * 2 + 1).to(device)
    labels = torch.randint(0, c, (b, size, size), generator=g).to(device)

    def update_direct() -> None:
        up = resize(e_s.detach(), (size, size))
        bank.update(up, labels, 0.999)

    def update_lowres() -> None:
        bank.update(e_s.detach(), labels, 0.999)

    def instance(chunk_rows: int):
        def fn() -> None:
            e_s.grad = None
            loss = instance_term(bank, e_w, e_s, z, (size, size), weight=0.5, chunk_rows=chunk_rows)
            loss.backward()

        return fn

    fn = {
        "update/direct": update_direct,
        "update/lowres": update_lowres,
        "instance/direct": instance(0),
        "instance/chunked": instance(args.chunk_rows),
    }[args.variant]

    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    # the first run pays one-off costs (allocator growth, kernel selection): report the rest
    steady = times[1:] if len(times) > 1 else times
    return {"variant": args.variant, "time_s": statistics.median(steady), "peak_bytes": peak}


def _child_cmd(args: argparse.Namespace, variant: str) -> list[str]:
    return [
        sys.executable, "-m", "benchmarks.dida_terms", "--variant", variant,
        "--size", str(args.size), "--k", str(args.k), "--batch", str(args.batch), "--device", args.device,
        "--dim", str(args.dim), "--classes", str(args.classes), "--chunk-rows", str(args.chunk_rows),
        "--repeats", str(args.repeats), "--threads", str(args.threads),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, help="crop size H = W (default 512 on cuda, 256 on cpu)")
    p.add_argument("--k", type=int, default=300, help="bank entries")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dim", type=int, default=256, help="embedding channels D")
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--chunk-rows", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs per variant (the first is not timed)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.size is None:
        args.size = 512 if args.device.startswith("cuda") else 256
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.variant is not None:
        print(json.dumps(_run_variant(args)))
        return 0

    print(
        f"DIDA terms, device={args.device}, crop {args.size}x{args.size}, embedding 1/4 "
        f"({args.size // 4}x{args.size // 4}), B={args.batch}, K={args.k}, D={args.dim}, C={args.classes}, "
        f"chunk_rows={args.chunk_rows}, torch {torch.__version__}"
    )
    results = {}
    for variant in VARIANTS:
        # a fixed mmap threshold makes glibc return every large tensor to the OS when it is freed, so
        # the maximum RSS tracks the live tensors instead of heap fragmentation
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
        out = subprocess.run(_child_cmd(args, variant), capture_output=True, text=True, env=env, check=False)
        if out.returncode != 0:
            print(f"{variant}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    mem = "CUDA max_memory_allocated" if args.device.startswith("cuda") else "max RSS increase"
    print(f"{'term':<10} {'direct s':>10} {'chunked s':>10} {'speed-up':>9} "
          f"{'direct MiB':>11} {'chunked MiB':>12} {'mem ratio':>10}   ({mem})")  # fmt: skip
    for term, fast in (("update", "lowres"), ("instance", "chunked")):
        a, b = results[f"{term}/direct"], results[f"{term}/{fast}"]
        ma, mb = a["peak_bytes"] / 2**20, b["peak_bytes"] / 2**20
        print(
            f"{term:<10} {a['time_s']:>10.3f} {b['time_s']:>10.3f} {a['time_s'] / b['time_s']:>8.1f}x "
            f"{ma:>11.1f} {mb:>12.1f} {ma / max(mb, 1e-9):>9.1f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

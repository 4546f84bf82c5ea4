"""Shared helpers of the benchmarks: machine description, timing with warm-up, tables, peak memory.

Every benchmark prints one table preceded by a description of the machine (CPU model, cores, torch
threads, load average, GPU name), so that a pasted table says where it was measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from dida.runtime import AMP_DTYPES

# ----------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), or ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device | str = "cpu") -> str:
    """One line: CPU, visible cores, torch threads, load average, GPU (when used), torch version."""
    device = torch.device(device)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    parts = [f"CPU {cpu_model()} ({cores} cores visible, torch threads {torch.get_num_threads()})"]
    with contextlib.suppress(OSError):
        parts.append("load avg {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        parts.append(f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB)")
    parts.append(f"torch {torch.__version__}, Python {platform.python_version()}")
    return "; ".join(parts)


def setup_threads(threads: int) -> int:
    """Fix torch's intra-op threads (``0``: all visible cores) and OpenCV's; returns the count."""
    if threads <= 0:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover
            threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    with contextlib.suppress(ImportError):
        import cv2

        cv2.setNumThreads(threads)
    return threads


def add_common_args(parser: Any, *, default_amp: str = "off") -> None:
    """``--device``, ``--amp``, ``--threads``, ``--warmup``, ``--iters`` (iters default set by caller)."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default=default_amp,
                        help="autocast dtype of the forwards (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all visible cores)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")


# ------------------------------------------------------------------------------------------ timing


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device | str, iters: int, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` (``warmup`` untimed calls first; synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device | str, iters: int,
                     warmup: int = 1) -> dict[str, list[float]]:
    """Like ``time_calls`` for several variants, run round-robin so that a change of machine load
    (shared CPUs) hits every variant alike. Returns seconds per call for each name."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            out[name].append(time.perf_counter() - t0)
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# ------------------------------------------------------------------------------------------ memory


@contextlib.contextmanager
def cuda_peak(device: torch.device | str) -> Iterator[dict[str, int]]:
    """Measure ``max_memory_allocated`` above the memory allocated on entry; fills ``["peak_bytes"]``."""
    device = torch.device(device)
    box: dict[str, int] = {}
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    try:
        yield box
    finally:
        sync(device)
        box["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        box["total_peak_bytes"] = torch.cuda.max_memory_allocated(device)


def max_rss_bytes() -> int:
    """The process's maximum resident set size so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(module: str, argv: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m module *argv`` in a fresh process and parse the JSON of its last stdout line.

    A fresh process per variant makes the CPU peak memory (max RSS) that variant's own. glibc's mmap
    threshold is fixed at 1 MiB so that freed tensors leave the resident set.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    out = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, env=env, check=False,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ tables


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pipes), columns padded; floats are expected pre-formatted as strings."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(r, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
                notes: Sequence[str] = ()) -> None:
    """Print ``title``, the table and optional note lines."""
    print(title)
    print(format_table(headers, rows))
    for n in notes:
        print(n)
    sys.stdout.flush()

"""Long-run health: 2,000 CPU iterations of the tiny preset; resident memory stops growing after warm-up.

Issue 9, item 7. Slow (minutes): run by hand with ``pytest -m slow tests/reliability/test_rel_longrun.py -s``.
The run is a ``python -m dida train`` subprocess (checkpoints, evaluation and logging included); its
VmRSS is read from ``/proc/<pid>/status`` while the iteration is read from ``metrics.jsonl``. Set
``DIDA_LONGRUN_ITERS`` to run fewer or more iterations.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from rel_helpers import cli, data_overrides

ITERS = int(os.environ.get("DIDA_LONGRUN_ITERS", "2000"))
WARMUP = ITERS // 10
MAX_GROWTH_MB = 40.0


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _iteration(metrics: Path) -> int:
    try:
        with open(metrics, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_resident_memory_is_flat_after_warmup(rel_data, tmp_path):
    run = tmp_path / "run"
    cmd = cli("train", "tiny_cpu", f"run.dir={run}", *data_overrides(rel_data), f"train.max_iters={ITERS}",
              f"train.checkpoint_interval={max(ITERS // 4, 1)}", "train.keep_last=2",
              f"train.eval_interval={max(ITERS // 4, 1)}", "train.log_interval=1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[int, float]] = []  # (iteration, RSS MiB), one per 100 iterations
    next_mark = WARMUP
    t0 = time.time()
    try:
        while proc.poll() is None:
            it = _iteration(run / "metrics.jsonl")
            if it >= next_mark:
                rss = _rss_mb(proc.pid)
                if rss is not None:
                    samples.append((it, rss))
                next_mark += 100
            time.sleep(0.05)
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    elapsed = time.time() - t0
    assert proc.returncode == 0, err[-3000:]
    report = {"iterations": ITERS, "seconds": round(elapsed, 1),
              "samples": [(i, round(r, 1)) for i, r in samples]}
    assert len(samples) >= 3, report
    first = samples[0][1]
    peak = max(r for _, r in samples)
    late = [r for i, r in samples if i >= ITERS // 2]
    report.update(first_after_warmup_mb=round(first, 1), peak_mb=round(peak, 1),
                  growth_mb=round(max(late) - first, 1))
    print("\nlong-run RSS:", json.dumps(report))
    (Path(os.environ.get("DIDA_LONGRUN_REPORT", tmp_path / "longrun.json"))).write_text(json.dumps(report))
    assert max(late) - first < MAX_GROWTH_MB, report

"""kill -9 in the middle of training, then ``dida train --resume``; and a second run on a busy run directory.

Issue 9, items 1 and 6. The run is a real ``python -m dida train`` subprocess writing a checkpoint every
iteration; it is killed with SIGKILL (no handler runs) right after ``iter_2.pth`` appears, i.e. while it
computes or writes a later one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from rel_helpers import cli, data_overrides, read_jsonl

from dida.checkpoint import list_checkpoints, read_checkpoint

MAX_ITERS = 16


def _train_cmd(data_root: Path, run_dir: Path) -> list[str]:
    return cli("train", "tiny_cpu", f"run.dir={run_dir}", *data_overrides(data_root),
               "run.deterministic=true",
               "train.checkpoint_interval=1", f"train.max_iters={MAX_ITERS}", "train.keep_last=3")


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the training process ended early (rc {proc.returncode}):\n{err[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the training process")
        time.sleep(0.02)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["iteration"] == b["iteration"]
    states = {"model": (a["model"], b["model"]), "ema_model": (a["ema_model"], b["ema_model"])}
    assert a["terms"].keys() == b["terms"].keys() == {"feature_distance"}  # the frozen ImageNet model
    states.update({f"terms.{k}": (a["terms"][k], b["terms"][k]) for k in a["terms"]})
    for key, (sa, sb) in states.items():
        assert sa.keys() == sb.keys()
        for name, t in sa.items():
            assert torch.equal(t, sb[name]), f"{key}.{name} differs"
    for pid, st in a["optimizer"]["state"].items():
        for name, t in st.items():
            assert torch.equal(t, b["optimizer"]["state"][pid][name]), f"optimizer state {pid}.{name} differs"


def test_kill9_then_resume_equals_an_uninterrupted_run(rel_data, tmp_path, capsys):
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_train_cmd(rel_data, run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        # --- item 6: while it runs, a second run on the same directory is refused by the lock ------
        lock = run / ".lock"
        _wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(proc.pid), proc)
        _wait_for(lambda: (run / "config.yaml").is_file(), proc)
        config_before = (run / "config.yaml").read_bytes()
        from dida.cli import main

        _wait_for(lambda: (run / "latest.pth").exists(), proc)
        capsys.readouterr()
        assert main(["train", "--resume", str(run)]) == 2  # refused (DidaError printed, no traceback)
        err = capsys.readouterr().err
        assert "another training run" in err and f"pid {proc.pid}" in err and "Traceback" not in err
        assert proc.poll() is None, "the first run finished too early for the lock check"
        assert (run / "config.yaml").read_bytes() == config_before

        # --- item 1: kill -9 once iteration 2 is on disk -------------------------------------------
        _wait_for(lambda: any(i >= 2 for i, _ in list_checkpoints(run)), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # no corrupt checkpoint: every complete file loads; latest.pth is the newest one, or the one before it
    # when the kill fell between writing iter_N.pth and linking latest.pth to it (then not yet pruned either)
    ckpts = list_checkpoints(run)
    for it, path in ckpts:
        assert read_checkpoint(path)["iteration"] == it
    killed_at = ckpts[-1][0]  # the newest complete checkpoint: the resume continues from it
    latest_at = read_checkpoint(run / "latest.pth")["iteration"]
    lagging = latest_at != killed_at
    assert not lagging or (len(ckpts) > 1 and latest_at == ckpts[-2][0])
    # keep_last=3 pruned only complete files; a fourth exists only in the window between writing the newest
    # and pruning the oldest
    assert 1 <= len(ckpts) <= 4
    assert 2 <= killed_at < MAX_ITERS
    # only the first run wrote the log (no interleaving from the refused one): rows 1, 2, ... once each
    complete = [line for line in (run / "metrics.jsonl").read_text().splitlines(keepends=True)
                if line.endswith("\n")]
    iters = [json.loads(line)["iter"] for line in complete]
    assert iters == list(range(1, len(iters) + 1)) and len(iters) >= killed_at

    res = subprocess.run(cli("train", "--resume", str(run)), capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"from iteration {killed_at}" in res.stdout

    ref = tmp_path / "reference"
    res = subprocess.run(_train_cmd(rel_data, ref), capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    a, b = read_checkpoint(ref / "latest.pth"), read_checkpoint(run / "latest.pth")
    assert b["iteration"] == MAX_ITERS
    _assert_same_state(a, b)
    # the log holds every iteration exactly once, with the same values as the uninterrupted run
    ra, rb = read_jsonl(ref / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    assert [r["iter"] for r in rb] == list(range(1, MAX_ITERS + 1))
    for x, y in zip(ra, rb):
        # wall-clock and memory fields differ between any two runs; everything else must be identical
        assert ({k: v for k, v in x.items() if not k.startswith(("time", "mem/"))}
                == {k: v for k, v in y.items() if not k.startswith(("time", "mem/"))})

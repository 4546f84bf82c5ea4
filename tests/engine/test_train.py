"""The training engine end to end on a tiny generated GTA -> Cityscapes pair (mit_b0, 64x64 crops)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dida.config import load_config
from dida.engine.train import NonFiniteLossError, train
from dida.errors import DidaError


@pytest.fixture(scope="module")
def data_root(fake_data) -> Path:
    return fake_data / "tiny_cpu"


def tiny(data_root: Path, run_dir: Path, *extra: str):
    return load_config("tiny_cpu", [f"run.dir={run_dir}", f"data.source.root={data_root / 'gta'}",
                                    f"data.target.root={data_root / 'cs'}", f"data.val.root={data_root / 'cs'}",
                                    *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_daformer_run_writes_the_run_directory(data_root, tmp_path):
    run = train(tiny(data_root, tmp_path / "run", "train.eval_interval=4", "train.debug_img_interval=2"))
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "eval.jsonl", "iter_2.pth", "iter_4.pth", "latest.pth"} <= names
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["iter"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"lr", "loss/src_ce", "loss/mix_ce", "loss/feat_dist"} <= set(r)
        assert all(v == v and abs(v) != float("inf") for v in r.values())
    assert 0.0 <= read_jsonl(run / "eval.jsonl")[-1]["mIoU"] <= 1.0
    assert sorted(p.name for p in (run / "debug").iterdir()) == ["000000.png", "000002.png"]
    ckpt = torch.load(run / "latest.pth", weights_only=True)
    assert ckpt["format"] == "dida" and ckpt["iteration"] == 4
    # the resolved config round-trips
    assert load_config(str(run / "config.yaml")) == tiny(data_root, tmp_path / "run", "train.eval_interval=4",
                                                         "train.debug_img_interval=2")


def test_teacher_is_the_ema_of_the_student(data_root, tmp_path):
    run = train(tiny(data_root, tmp_path / "run", "train.max_iters=2", "train.checkpoint_interval=1"))
    c1 = torch.load(run / "iter_1.pth", weights_only=True)
    c2 = torch.load(run / "iter_2.pth", weights_only=True)
    # Step 0 initialises the teacher from the student; step 1 starts with alpha_1 = min(1 - 1/2, 0.999).
    checked = 0
    for name, t2 in c2["ema_model"].items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # BN buffers are the teacher's own (reference)
        expected = 0.5 * c1["ema_model"][name] + 0.5 * c1["model"][name]
        torch.testing.assert_close(t2, expected)
        checked += 1
    assert checked > 50
    assert not torch.equal(c2["ema_model"]["decode_head.conv_seg.weight"], c2["model"]["decode_head.conv_seg.weight"])


@pytest.mark.parametrize("method", ["daformer", "dida"])
def test_resume_reproduces_an_uninterrupted_run(data_root, tmp_path, method):
    extra = ["train.max_iters=4", "train.checkpoint_interval=2", f"uda.dual_level.enabled={method == 'dida'}",
             "uda.bank.init=random", "uda.bank.size=19", "uda.bank.update_interval=2"]
    full = train(tiny(data_root, tmp_path / "full", *extra))
    # An interrupted copy: the state after iteration 2 only.
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(full / "config.yaml", part)
    shutil.copy(full / "iter_2.pth", part / "latest.pth")
    (part / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (full / "metrics.jsonl").read_text().splitlines()[:2]))
    from dida.cli import main

    assert main(["train", "--resume", str(part)]) == 0
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(part / "metrics.jsonl")
    assert [r["iter"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert _no_timing(ra) == _no_timing(rb)
    wa = torch.load(full / "latest.pth", weights_only=True)
    wb = torch.load(part / "latest.pth", weights_only=True)
    assert set(wa["terms"]) == ({"feature_distance", "dual_level"} if method == "dida" else {"feature_distance"})
    states = {"model": (wa["model"], wb["model"]), "ema_model": (wa["ema_model"], wb["ema_model"]),
              **{f"terms.{t}": (wa["terms"][t], wb["terms"][t]) for t in wa["terms"]}}
    for key, (sa, sb) in states.items():
        assert sa.keys() == sb.keys()
        for name in sa:
            assert torch.equal(sa[name], sb[name]), f"{key}.{name}"


def test_resume_continues_from_a_checkpoint_written_but_not_yet_linked(data_root, tmp_path, capsys):
    """A kill -9 between writing ``iter_N.pth`` and pointing ``latest.pth`` at it: the resume continues from
    ``iter_N.pth`` (nothing computed is lost), links ``latest.pth`` to it, and ends where an uninterrupted run
    ends."""
    extra = ["train.max_iters=3", "train.checkpoint_interval=1"]
    full = train(tiny(data_root, tmp_path / "full", *extra))
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(full / "config.yaml", part)
    for name in ("iter_1.pth", "iter_2.pth"):
        shutil.copy(full / name, part / name)
    shutil.copy(full / "iter_1.pth", part / "latest.pth")  # a copy, lagging one checkpoint behind
    (part / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (full / "metrics.jsonl").read_text().splitlines()[:2]))
    from dida.cli import main

    capsys.readouterr()
    assert main(["train", "--resume", str(part)]) == 0
    assert "from iteration 2" in capsys.readouterr().out
    assert [r["iter"] for r in read_jsonl(part / "metrics.jsonl")] == [1, 2, 3]
    wa = torch.load(full / "latest.pth", weights_only=True)
    wb = torch.load(part / "latest.pth", weights_only=True)
    assert wb["iteration"] == 3
    for name in wa["model"]:
        assert torch.equal(wa["model"][name], wb["model"][name]), name


def test_a_new_run_is_refused_where_checkpoints_exist_without_latest(data_root, tmp_path):
    run = tmp_path / "run"
    train(tiny(data_root, run, "train.max_iters=1"))
    (run / "latest.pth").unlink()  # a kill -9 before the first link: iter_1.pth alone
    with pytest.raises(DidaError, match="--resume"):
        train(tiny(data_root, run, "train.max_iters=1"))
    assert (run / "iter_1.pth").is_file()


def _no_timing(row: dict) -> dict:
    """A metrics row without its wall-clock and memory fields (they differ between any two runs)."""
    return {k: v for k, v in row.items() if not k.startswith(("time", "mem/"))}


def test_dida_bank_changes_only_on_update_iterations(data_root, tmp_path):
    run = train(tiny(data_root, tmp_path / "run", "uda.dual_level.enabled=true", "uda.bank.init=random",
                     "uda.bank.size=19", "uda.bank.update_interval=2", "train.max_iters=4",
                     "train.checkpoint_interval=1"))
    banks = [torch.load(run / f"iter_{i}.pth", weights_only=True)["terms"]["dual_level"]["bank.features"]
             for i in range(1, 5)]
    # Updates run at iterations 0 and 2 (0-based), i.e. inside checkpoints 1 and 3.
    assert torch.equal(banks[0], banks[1])  # iteration 1: no update
    assert not torch.equal(banks[1], banks[2])  # iteration 2: update
    assert torch.equal(banks[2], banks[3])
    assert "loss/instance" in read_jsonl(run / "metrics.jsonl")[0]


def test_source_only_logs_only_the_source_loss(data_root, tmp_path):
    run = train(tiny(data_root, tmp_path / "run", "uda.self_training=false", "uda.feature_distance.enabled=false",
                     "train.max_iters=2"))
    row = read_jsonl(run / "metrics.jsonl")[0]
    assert "loss/src_ce" in row and "loss/mix_ce" not in row


def test_existing_run_directory_needs_resume(data_root, tmp_path):
    train(tiny(data_root, tmp_path / "run", "train.max_iters=2"))
    with pytest.raises(DidaError, match="--resume"):
        train(tiny(data_root, tmp_path / "run", "train.max_iters=2"))


def _nan_at(monkeypatch, at: int) -> None:
    from dida.uda import step as step_mod

    original = step_mod.SelfTrainingStep.__call__

    def patched(self, batch, step, *args, backward=None, **kwargs):
        if step == at and backward is not None:
            # A diverging mixed loss: NaN in its value and in the gradients it sends back.
            real_backward = backward

            def backward(loss):
                real_backward(loss * float("nan"))
        out = original(self, batch, step, *args, backward=backward, **kwargs)
        if step == at:
            out.losses["loss/mix_ce"] = out.losses["loss/mix_ce"] * float("nan")
        return out

    monkeypatch.setattr(step_mod.SelfTrainingStep, "__call__", patched)


def test_nonfinite_loss_stops_with_iteration_name_and_checkpoint(data_root, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 2)
    with pytest.raises(NonFiniteLossError, match=r"loss/mix_ce at iteration 2.*iter_2\.pth"):
        train(tiny(data_root, tmp_path / "run"))


def test_nonfinite_loss_is_skipped_when_asked(data_root, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 1)
    run = train(tiny(data_root, tmp_path / "run", "train.skip_nonfinite=true"))
    ckpt = torch.load(run / "latest.pth", weights_only=True)
    assert ckpt["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dida", *args]


def test_ctrl_c_writes_a_checkpoint_and_resume_continues(data_root, tmp_path):
    run = tmp_path / "run"
    cmd = _cli("train", "tiny_cpu", f"run.dir={run}", f"data.source.root={data_root / 'gta'}",
               f"data.target.root={data_root / 'cs'}", f"data.val.root={data_root / 'cs'}",
               "train.max_iters=100000", "train.checkpoint_interval=0")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint" in err
    ckpt = torch.load(run / "latest.pth", weights_only=True)
    done = ckpt["iteration"]
    assert done >= 2 and len((run / "metrics.jsonl").read_text().splitlines()) == done
    res = subprocess.run(_cli("train", "--resume", str(run), f"train.max_iters={done + 2}"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert torch.load(run / "latest.pth", weights_only=True)["iteration"] == done + 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)

    def dump(models):
        torch.save({k: m.state_dict() for k, m in models.items()}, f"{out_dir}/rank{rank}.pt")

    train(cfg, on_end=dump)


def _two_process_run(data_root: Path, out: Path, mode: str) -> tuple[dict, dict]:
    cfg = tiny(data_root, out / "run", "train.max_iters=3", "uda.dual_level.enabled=true",
               "uda.bank.init=random", "uda.bank.size=19", "uda.bank.update_interval=2",
               "uda.mic.enabled=true", "uda.mic.block_size=8", f"train.distributed={mode}")
    out.mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(out)), nprocs=2, join=True)
    return torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)


def test_two_process_gloo_run_keeps_ranks_identical(data_root, tmp_path):
    """DistributedDataParallel (no_sync in every phase but the last: here source, mixed and MIC) and the flat
    all-reduce both keep the ranks identical, and give the same model."""
    runs = {mode: _two_process_run(data_root, tmp_path / mode, mode) for mode in ("ddp", "flat_allreduce")}
    for r0, r1 in runs.values():
        assert set(r0) == {"model", "ema_model", "feature_distance", "dual_level", "mic"}
        for key in r0:
            for name, t in r0[key].items():
                if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                    continue  # BatchNorm statistics are per rank (no SyncBN, as in the reference)
                assert torch.equal(t, r1[key][name]), f"{key}.{name} differs across ranks"
        # The ranks saw different data: their BN statistics differ.
        assert not torch.equal(r0["model"]["decode_head.fuse_layer.bottleneck.bn.running_mean"],
                               r1["model"]["decode_head.fuse_layer.bottleneck.bn.running_mean"])
    ddp, flat = runs["ddp"][0]["model"], runs["flat_allreduce"][0]["model"]
    for name, t in ddp.items():
        torch.testing.assert_close(t, flat[name], rtol=1e-4, atol=1e-6, msg=name)


def test_an_empty_feature_distance_mask_is_logged_as_nan_and_training_goes_on(data_root, tmp_path, monkeypatch):
    """``uda.feature_distance.empty_mask=nan`` reproduces the reference: NaN logged, the other losses' gradients
    applied, no stop."""
    from dida.uda.terms import feature_distance as fd_mod

    monkeypatch.setattr(fd_mod, "thing_mask", lambda labels, scale, *a, **k: torch.zeros(
        labels.shape[0], labels.shape[1] // scale, labels.shape[2] // scale, dtype=torch.bool))
    run = train(tiny(data_root, tmp_path / "run", "uda.feature_distance.empty_mask=nan", "train.max_iters=2",
                     "train.checkpoint_interval=1"))
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["iter"] for r in rows] == [1, 2]
    assert all(r["loss/feat_dist"] != r["loss/feat_dist"] for r in rows)  # NaN
    c1 = torch.load(run / "iter_1.pth", weights_only=True)
    c2 = torch.load(run / "iter_2.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in c2["model"].values() if v.is_floating_point())
    assert not torch.equal(c1["model"]["decode_head.conv_seg.weight"], c2["model"]["decode_head.conv_seg.weight"])

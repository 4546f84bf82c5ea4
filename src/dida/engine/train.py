"""``train(cfg)``: the iteration-based training loop (source-only, DAFormer, DIDA).

One readable function with comment-headed phases (DINOv2's ``do_train`` style). The step
(``dida.uda.step``) returns losses; this loop owns backward, the optimizer, logging, evaluation and
checkpoints. Every iteration is a pure function of (state, seed, iteration): the data pipeline draws
its randomness from the global sample index and the step's generator and torch's global RNG are
re-seeded from (seed, iteration, rank), so ``--resume`` continues exactly where a run stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dida import __version__
from dida.config import Config, load_config, to_yaml
from dida.constants import CITYSCAPES_CLASSES
from dida.engine import distributed as dist_utils
from dida.engine.logging import DebugVisualizer, MetricWriter
from dida.engine.optim import build_optimizer, set_learning_rates
from dida.errors import CheckpointError, ConfigError, DataError, DidaError
from dida.io import atomic_path, atomic_torch_save

CHECKPOINT_RE = re.compile(r"^iter_(\d+)\.pth$")


class NonFiniteLossError(DidaError):
    """A loss became NaN or inf."""


# ------------------------------------------------------------------------------------ run folder


class RunLock:
    """An exclusive ``flock`` on ``run_dir/.lock``: a second run on the same folder is refused.

    The kernel releases the lock when the process dies (even on kill -9), so no stale lock remains.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DidaError(
                f"{self.path.parent}: another training run (pid {other}) is using this run directory. "
                "Wait for it to finish, or choose another run.dir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete ``iter_N.pth`` files, oldest first (temporary files never match)."""
    out = []
    for p in run_dir.glob("iter_*.pth"):
        m = CHECKPOINT_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def write_checkpoint(run_dir: Path, it: int, state: dict[str, Any], keep_last: int | None) -> Path:
    """Write ``iter_{it}.pth`` atomically, point ``latest.pth`` at it atomically, prune old ones."""
    path = run_dir / f"iter_{it}.pth"
    atomic_torch_save(state, path)
    with atomic_path(run_dir / "latest.pth") as tmp:
        tmp.unlink()
        try:
            os.link(path, tmp)  # a hard link: no second copy on disk
        except OSError:
            shutil.copyfile(path, tmp)
    if keep_last is not None:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------- helpers


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True


def iteration_seed(seed: int, it: int, rank: int) -> int:
    """A distinct 63-bit seed per (seed, iteration, rank)."""
    return (seed * 1_000_003 + it * 7919 + rank * 104_729 + 12345) % (2**63 - 1)


class _StopRequest:
    """SIGINT/SIGTERM handler: the loop checkpoints at the end of the current iteration, then stops.

    A second Ctrl-C interrupts at once (no checkpoint).
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested} received: finishing this iteration, then writing a checkpoint "
              "(Ctrl-C again to quit at once).", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopRequest]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, h in self._old.items():
                signal.signal(s, h)


def _truncate_log(path: Path, last_iter: int) -> None:
    """Keep the complete JSON rows of ``path`` with ``iter <= last_iter`` (atomic rewrite)."""
    import json

    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if line.endswith("\n") and isinstance(row, dict) and int(row.get("iter", 0)) <= last_iter:
            keep.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(keep))


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------- builders


def build_models(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, Any, Any, Any]:
    """Student, EMA teacher, frozen ImageNet model (for FD) and instance bank, as the config asks."""
    from dida.checkpoint import load_checkpoint
    from dida.models import build_segmentor_from_cfg
    from dida.uda.ema import EMATeacher

    student = build_segmentor_from_cfg(cfg.model)
    if cfg.model.pretrained:
        load_checkpoint(student.backbone, cfg.model.pretrained)
    student.to(device)
    method = cfg.uda.method
    teacher = None
    if method != "source_only":
        teacher = EMATeacher(student, alpha=cfg.uda.ema.alpha, update_buffers=cfg.uda.ema.update_buffers,
                             bn_eval=cfg.uda.ema.teacher_bn_eval)
    imnet = None
    if method != "source_only" and cfg.uda.feature_distance.enabled:
        import copy

        # The reference builds a third model from the same config: its backbone holds the ImageNet
        # weights (or, without them, the same initial weights as the student) and is never updated.
        imnet = copy.deepcopy(student.backbone).eval().requires_grad_(False)
    bank = None
    if method == "dida":
        bank = build_bank(cfg, embed_dim=student.embed_dim).to(device)
    return student, teacher, imnet, bank


def build_bank(cfg: Config, *, embed_dim: int) -> Any:
    from dida.uda.instance_bank import InstanceBank

    b = cfg.uda.bank
    if b.init == "random":
        gen = torch.Generator().manual_seed(cfg.run.seed)
        return InstanceBank.random(b.size, embed_dim, cfg.model.num_classes, generator=gen)
    if not b.features_path or not b.labels_path:
        raise ConfigError(
            "uda.bank.features_path / uda.bank.labels_path: DIDA needs an instance bank. Point them at the "
            "reference's f_buffer_s.npz / l_buffer_s.npz (the DIDA repository's embedding_cache/), build one "
            "with `dida bank build CHECKPOINT --data ROOT --out DIR`, or set uda.bank.init=random."
        )
    bank = InstanceBank.from_npz(b.features_path, b.labels_path)
    if bank.dim != embed_dim:
        raise ConfigError(
            f"{b.features_path}: the bank holds {bank.dim}-dimensional features but the model's embedding "
            f"has {embed_dim} channels (model.decoder_channels). Use a bank built for this model."
        )
    return bank


# ---------------------------------------------------------------------------------------- train


def train(
    cfg: Config,
    resume: str | os.PathLike[str] | None = None,
    *,
    on_end: Callable[[dict[str, torch.nn.Module]], None] | None = None,
) -> Path:
    """Train as configured; returns the run directory.

    Args:
        cfg: the resolved configuration.
        resume: a run directory to continue from its ``latest.pth``.
        on_end: called on every rank after the last iteration with ``{"model": student, "ema_model":
            teacher, ...}`` (hooks for tests and tools; nothing else reaches into the loop).
    """
    # ---- process group, device, run directory ----------------------------------------------------
    device = dist_utils.init_from_env(cfg.run.device)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    is_main = rank == 0
    run_dir = Path(resume) if resume is not None else Path(cfg.run.dir)
    if resume is None and (run_dir / "latest.pth").exists():
        raise DidaError(
            f"{run_dir}: this run directory already holds a checkpoint. Continue it with "
            f"`dida train --resume {run_dir}`, or choose another run.dir."
        )
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp: fp16 needs a CUDA device; use bf16 or off on CPU.")
    lock = RunLock(run_dir) if is_main else contextlib.nullcontext()
    with lock:
        run_dir.mkdir(parents=True, exist_ok=True)
        if is_main:
            with atomic_path(run_dir / "config.yaml") as tmp:
                tmp.write_text(to_yaml(cfg))
        try:
            return _train(cfg, device, run_dir, resume is not None, rank, world, on_end)
        finally:
            dist_utils.cleanup()


def _train(cfg: Config, device: torch.device, run_dir: Path, resuming: bool, rank: int, world: int,
           on_end: Callable[[dict[str, torch.nn.Module]], None] | None) -> Path:
    from dida.checkpoint import read_checkpoint
    from dida.data import build_uda_datasets
    from dida.data.loader import build_train_loader
    from dida.engine.evaluate import evaluate
    from dida.uda.step import build_step

    is_main = rank == 0
    t_cfg = cfg.train
    seed_everything(cfg.run.seed + rank, cfg.run.deterministic)

    # ---- models, optimizer ----------------------------------------------------------------------
    student, teacher, imnet, bank = build_models(cfg, device)
    dist_utils.broadcast_module(student)
    if t_cfg.channels_last:
        student.to(memory_format=torch.channels_last)
    o = cfg.optim
    optimizer = build_optimizer(
        student.named_parameters(), lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps,
        weight_decay=o.weight_decay, head_lr_mult=o.head_lr_mult, norm_decay_mult=o.norm_decay_mult,
    )
    schedule = dict(max_iters=t_cfg.max_iters, warmup_iters=o.warmup_iters, warmup_ratio=o.warmup_ratio,
                    power=o.power, min_lr=o.min_lr)
    scaler = torch.amp.GradScaler(device.type) if t_cfg.amp == "fp16" else None

    # ---- resume ---------------------------------------------------------------------------------
    start_iter = 0
    bad_files: list[str] = []
    if resuming:
        latest = run_dir / "latest.pth"
        if not latest.exists():
            raise CheckpointError(f"{latest}: no checkpoint to resume from (the run never saved one).")
        ckpt = read_checkpoint(latest)
        try:
            student.load_state_dict(ckpt["model"])
            if teacher is not None and ckpt.get("ema_model") is not None:
                teacher.model.load_state_dict(ckpt["ema_model"])
            if imnet is not None and ckpt.get("imnet_model") is not None:
                imnet.load_state_dict(ckpt["imnet_model"])
            if bank is not None and ckpt.get("instance_bank") is not None:
                bank.load_state_dict(ckpt["instance_bank"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            start_iter = int(ckpt["iteration"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[:4]
            raise CheckpointError(
                f"{latest}: does not match this run's model/optimizer ({type(e).__name__}: "
                f"{' '.join(line.strip() for line in first)[:400]}). It was written by another "
                "configuration: resume without model overrides, or start a new run.dir."
            ) from None
        if is_main:  # drop log rows written after this checkpoint (a kill -9 between log and save)
            for name in ("metrics.jsonl", "eval.jsonl"):
                _truncate_log(run_dir / name, start_iter)
        bad_files = list(ckpt.get("meta", {}).get("bad_files", []))
        if is_main:
            print(f"Resuming {run_dir} from iteration {start_iter}.", flush=True)
        del ckpt

    def make_state(it: int) -> dict[str, Any]:
        return {
            "format": "dida", "version": 1,
            "model": student.state_dict(),
            "ema_model": teacher.model.state_dict() if teacher is not None else None,
            "imnet_model": imnet.state_dict() if imnet is not None else None,
            "instance_bank": bank.state_dict() if bank is not None else None,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "scheduler": {"iteration": it},
            "iteration": it,
            "config": to_yaml(cfg),
            "meta": {"dida_version": __version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "world_size": world, "bad_files": list(bad_files)},
        }

    def save(it: int) -> Path | None:
        if not is_main:
            return None
        try:
            return write_checkpoint(run_dir, it, make_state(it), t_cfg.keep_last)
        except OSError as e:
            last = list_checkpoints(run_dir)
            kept = (f"the previous checkpoint {last[-1][1]} is intact" if last
                    else "no earlier checkpoint exists")
            raise CheckpointError(
                f"{run_dir / f'iter_{it}.pth'}: writing the checkpoint failed ({e}); {kept}. Free disk space "
                "or fix the folder's permissions, then continue with --resume.") from e

    # ---- data ------------------------------------------------------------------------------------
    train_set, val_set = build_uda_datasets(cfg.data, seed=cfg.run.seed)
    loader = build_train_loader(
        train_set, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, start_iter=start_iter,
        rank=rank, world_size=world, pin_memory=cfg.data.pin_memory and device.type == "cuda",
        seed=cfg.run.seed,
    )

    # ---- the step --------------------------------------------------------------------------------
    step_model = torch.compile(student) if t_cfg.compile else student
    step = build_step(cfg.uda, student=step_model, teacher=teacher, imnet_model=imnet, bank=bank,
                      num_classes=cfg.model.num_classes)
    writer = MetricWriter(run_dir, max_iters=t_cfg.max_iters, start_iter=start_iter, enabled=is_main)
    visualizer = DebugVisualizer(run_dir / "debug")
    generator = torch.Generator()

    def backward(loss: torch.Tensor, retain_graph: bool = False) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward(retain_graph=retain_graph)

    def run_eval(it: int) -> None:
        if is_main:
            metrics = evaluate(student, val_set, device=device, mode=cfg.eval.mode,
                               crop_size=tuple(cfg.eval.crop_size), stride=tuple(cfg.eval.stride),
                               amp=t_cfg.amp, num_classes=cfg.model.num_classes, progress=False,
                               max_images=cfg.eval.max_images)
            writer.log_eval(it, metrics, run_dir, list(CITYSCAPES_CLASSES[: cfg.model.num_classes])
                            if cfg.model.num_classes <= len(CITYSCAPES_CLASSES)
                            else [str(i) for i in range(cfg.model.num_classes)])
        dist_utils.barrier()

    # ---- loop ------------------------------------------------------------------------------------
    sums: dict[str, torch.Tensor] = {}
    n_logged = 0
    it = start_iter
    data_iter = iter(loader)
    stop = _StopRequest()
    student.train()
    with stop.installed():
        try:
            while it < t_cfg.max_iters:
                # data
                try:
                    batch = next(data_iter)
                except DidaError as e:
                    save(it)
                    raise DataError(f"{e} (training stopped at iteration {it}; checkpoint written to "
                                    f"{run_dir / 'latest.pth'}; fix the data, then --resume)") from None
                for f in batch.pop("bad_files", []) or []:
                    # distinct files count against max_bad_samples (one bad file may be drawn often)
                    new = [x for x in (f if isinstance(f, list) else [f]) if x not in bad_files]
                    bad_files.extend(new)
                    if is_main and new:
                        print(f"warning: skipped unreadable sample(s) {', '.join(new)} (replaced by other "
                              f"samples; {len(bad_files)} of data.max_bad_samples="
                              f"{cfg.data.max_bad_samples})", file=sys.stderr, flush=True)
                if len(bad_files) > cfg.data.max_bad_samples:
                    save(it)
                    raise DataError(
                        f"{len(bad_files)} unreadable samples (more than data.max_bad_samples="
                        f"{cfg.data.max_bad_samples}); training stopped at iteration {it}. Files:\n  "
                        + "\n  ".join(sorted(set(bad_files))))
                batch = _to_device(batch, device, t_cfg.channels_last)

                # one step: lr, forward/backward per stage, optimizer
                torch.manual_seed(iteration_seed(cfg.run.seed, it, rank))
                generator.manual_seed(iteration_seed(cfg.run.seed, it, rank) + 1)
                lr = set_learning_rates(optimizer, it, **schedule)
                optimizer.zero_grad(set_to_none=True)
                want_debug = is_main and t_cfg.debug_img_interval > 0 and it % t_cfg.debug_img_interval == 0
                with _autocast(device, t_cfg.amp):
                    out = step(batch, it, generator=generator, backward=backward, debug=want_debug)
                losses = out.losses
                finite = torch.isfinite(torch.stack([v.float() for v in losses.values()])).all()
                if not bool(finite):  # the one host sync per iteration
                    bad = [k for k, v in losses.items() if not torch.isfinite(v).all()]
                    if t_cfg.skip_nonfinite:
                        optimizer.zero_grad(set_to_none=True)
                        if is_main:
                            print(f"warning: non-finite {', '.join(bad)} at iteration {it}; step skipped.",
                                  file=sys.stderr, flush=True)
                    else:
                        last = list_checkpoints(run_dir)
                        where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint yet"
                        raise NonFiniteLossError(
                            f"non-finite loss {', '.join(bad)} at iteration {it}; {where}. Lower the "
                            "learning rate or set train.skip_nonfinite=true to skip such steps.")
                else:
                    dist_utils.all_reduce_gradients(student.parameters())
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    if o.grad_clip:
                        torch.nn.utils.clip_grad_norm_(student.parameters(), o.grad_clip)
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                it += 1

                # logging, debug images, evaluation, checkpoints
                for k, v in {**losses, **out.stats}.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
                n_logged += 1
                if is_main and t_cfg.log_interval and (it % t_cfg.log_interval == 0 or it == t_cfg.max_iters):
                    values = {"lr": lr, **{k: float(v) / n_logged for k, v in sums.items()}}
                    writer.log(it, values)
                    sums, n_logged = {}, 0
                if want_debug and out.debug:
                    visualizer(it - 1, out.debug)
                if t_cfg.eval_interval and (it % t_cfg.eval_interval == 0 or it == t_cfg.max_iters):
                    run_eval(it)
                    student.train()
                if (t_cfg.checkpoint_interval and it % t_cfg.checkpoint_interval == 0) or it == t_cfg.max_iters:
                    save(it)
                if stop.requested:
                    path = save(it)
                    if is_main:
                        print(f"Stopped by {stop.requested} after iteration {it}; checkpoint {path}. "
                              f"Continue with `dida train --resume {run_dir}`.", file=sys.stderr, flush=True)
                    raise KeyboardInterrupt
        finally:
            writer.close()
    if on_end is not None:
        models = {"model": student}
        if teacher is not None:
            models["ema_model"] = teacher.model
        if bank is not None:
            models["instance_bank"] = bank
        on_end(models)
    return run_dir


# ------------------------------------------------------------------------------------------- CLI


def main_train(args: Any) -> int:
    """``dida train PRESET_OR_YAML [key=value ...]`` and ``dida train --resume RUN_DIR [key=value ...]``."""
    from dida.config import describe_schema, preset_names

    if args.list_presets:
        print("\n".join(preset_names()))
        return 0
    if args.help_config:
        print(describe_schema())
        return 0
    overrides = list(args.overrides)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise DidaError(f"{run_dir}: not a run directory (no config.yaml). Give the folder of an earlier run.")
        if args.config is not None:  # `dida train --resume DIR key=value`: argparse put the first override here
            overrides.insert(0, args.config)
        cfg = load_config(str(run_dir), overrides)
        cfg.run.dir = str(run_dir)
        train(cfg, resume=run_dir)
        return 0
    if args.config is None:
        raise ConfigError("give a preset or YAML (see `dida train --list-presets`), or --resume RUN_DIR.")
    cfg = load_config(args.config, overrides)
    run_dir = train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"Done: {run_dir}")
    return 0

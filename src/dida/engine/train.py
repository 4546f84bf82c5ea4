"""``train(cfg)``: the iteration-based training loop.

The step (``dida.uda.step``) returns losses; this loop owns backward, the optimizer, logging, evaluation and
checkpoints, in the order of DINOv2's ``do_train``: build (models, terms, optimizer) -> restore -> data ->
step -> per iteration: learning rate, step with per-phase backward, gradients applied, EMA/terms state
advanced by the step itself, log, debug images, evaluation, checkpoint.

Every iteration is a pure function of (state, seed, iteration): the data pipeline draws its randomness
from the global sample index and the step's generator and torch's global RNG are re-seeded from
(seed, iteration, rank), so ``--resume`` continues exactly where a run stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dida.checkpoint import (
    TrainingState,
    link_checkpoint,
    list_checkpoints,
    restore_training_state,
    resume_checkpoint,
    training_state_dict,
    write_checkpoint,
)
from dida.config import Config, to_yaml
from dida.constants import class_names
from dida.engine import distributed as dist_utils
from dida.engine.logging import DebugVisualizer, MetricWriter, peak_memory_gib
from dida.engine.optim import build_optimizer, set_learning_rates
from dida.errors import CheckpointError, ConfigError, DataError, DidaError
from dida.io import atomic_path
from dida.runtime import autocast, compile_models

__all__ = ["NonFiniteLossError", "RunLock", "RunStopped", "build_models", "build_training_state", "train"]


class NonFiniteLossError(DidaError):
    """A loss (or the gradients) became NaN or inf."""


class RunStopped(KeyboardInterrupt):
    """The run stopped on SIGINT / SIGTERM after writing a checkpoint; the message says how to continue.

    Attributes:
        exit_code: 130 (SIGINT) or 143 (SIGTERM), as a shell reports a process ended by the signal.
    """

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
        """Install the handlers for the block. SIGTERM sent to the whole process group (``docker stop``, Slurm)
        also ends the DataLoader workers: once a stop is requested, PyTorch's SIGCHLD handler (which raises
        wherever the main thread happens to be) is held back, so that the loop reaches its checkpoint."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        previous = signal.getsignal(signal.SIGCHLD)
        if callable(previous):
            def on_child(signum: int, frame: Any) -> None:
                if self.requested is None:
                    previous(signum, frame)

            self._old[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, on_child)
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


# ------------------------------------------------------------------------------------- builders


def build_models(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The student (with ``model.pretrained`` in its backbone) and, for self-training, its EMA teacher."""
    from dida.checkpoint import load_checkpoint
    from dida.models import build_model
    from dida.uda.ema import EMATeacher

    student = build_model(cfg.model)
    if cfg.model.pretrained:
        load_checkpoint(student.backbone, cfg.model.pretrained)
    student.to(device)
    teacher = None
    if cfg.uda.self_training:
        e = cfg.uda.ema
        teacher = EMATeacher(student, alpha=e.alpha, update_buffers=e.update_buffers, bn_eval=e.teacher_bn_eval)
    return student, teacher


def build_training_state(cfg: Config, device: torch.device) -> TrainingState:
    """Student, teacher, the enabled terms, the optimizer and (fp16) the gradient scaler."""
    from dida.uda.terms import TermBuildContext, build_terms

    student, teacher = build_models(cfg, device)
    dist_utils.broadcast_module(student)
    if cfg.train.channels_last:
        student.to(memory_format=torch.channels_last)
    terms = build_terms(cfg, TermBuildContext(student=student, device=device, seed=cfg.run.seed))
    for term in terms.values():  # e.g. a randomly initialised ImageNet model: the same on every rank
        dist_utils.broadcast_module(term)
    o = cfg.optim
    optimizer = build_optimizer(
        student.named_parameters(), lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps,
        weight_decay=o.weight_decay, head_lr_mult=o.head_lr_mult, norm_decay_mult=o.norm_decay_mult,
        layer_decay=o.layer_decay, backbone=student.backbone,
    )
    scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
    return TrainingState(student=student, teacher=teacher, terms=terms, optimizer=optimizer, scaler=scaler,
                         meta={"bad_files": []})


# ---------------------------------------------------------------------------------------- train


def train(
    cfg: Config,
    resume: str | os.PathLike[str] | None = None,
    *,
    on_end: Callable[[dict[str, torch.nn.Module]], None] | None = None,
    force: bool = False,
) -> Path:
    """Train as configured; returns the run directory.

    ``run_dir/config.yaml`` is written once the run has started (models built, data found, checkpoint
    restored): a run that fails at once, or a refused ``--resume``, leaves the folder as it was.

    Args:
        cfg: the resolved configuration.
        resume: a run directory to continue from its ``latest.pth``.
        on_end: called on every rank after the last iteration with ``{"model": student, "ema_model":
            teacher, <term name>: term, ...}`` (hooks for tests and tools; nothing else reaches into the loop).
        force: start a new run in a folder whose ``config.yaml`` holds another configuration (and no checkpoint).
    """
    device = dist_utils.init_from_env(cfg.run.device)
    rank = dist_utils.rank()
    run_dir = Path(resume) if resume is not None else Path(cfg.run.dir)
    _check_run_dir(run_dir, cfg, resuming=resume is not None, force=force)
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp: fp16 needs a CUDA device; use bf16 or off on CPU.")
    created = not run_dir.exists()
    lock = RunLock(run_dir) if rank == 0 else contextlib.nullcontext()
    with lock:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            run = _TrainingRun(cfg, device, run_dir, rank, dist_utils.world_size())
            try:
                run.prepare(resuming=resume is not None)
                _check_max_iters(run.state.iteration, cfg.train.max_iters, run_dir)
            except BaseException:
                if created and rank == 0:  # nothing of the run's exists yet: leave no empty folder behind
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise
            if rank == 0:
                with atomic_path(run_dir / "config.yaml") as tmp:
                    tmp.write_text(to_yaml(cfg))
            run.loop()
            if on_end is not None:
                on_end(run.models())
            return run_dir
        finally:
            dist_utils.cleanup()


def _check_max_iters(iteration: int, max_iters: int, run_dir: Path) -> None:
    """A resumed run whose ``train.max_iters`` is below the iteration it reached: refused before ``config.yaml``
    is rewritten (it would record a length the checkpoints are already past, and do nothing)."""
    if iteration > max_iters:
        raise ConfigError(
            f"train.max_iters={max_iters} is below the iteration {run_dir} already reached ({iteration}); "
            f"nothing to do, and {run_dir / 'config.yaml'} is left as it was. Give train.max_iters > {iteration} "
            "to continue the run."
        )


def _check_run_dir(run_dir: Path, cfg: Config, *, resuming: bool, force: bool) -> None:
    """Refuse a run folder that is a file, or (a new run) one holding a checkpoint or another configuration."""
    from dida.io import claim_output

    if run_dir.exists() and not run_dir.is_dir():
        raise DidaError(f"{run_dir}: is a file, not a folder; choose another run.dir.")
    claim_output(run_dir, kind="dir", files=(), option="run.dir")  # a read-only or full disk: before any work
    if resuming:
        return
    if (run_dir / "latest.pth").exists() or list_checkpoints(run_dir):
        raise DidaError(
            f"{run_dir}: this run directory already holds a checkpoint. Continue it with "
            f"`dida train --resume {run_dir}`, or choose another run.dir."
        )
    config = run_dir / "config.yaml"
    if config.is_file() and not force and config.read_text(errors="replace") != to_yaml(cfg):
        raise DidaError(
            f"{config}: this folder already holds another configuration (a run that stopped before its first "
            "checkpoint, or a file of yours), which a new run would replace. Choose another run.dir, or pass "
            "--force to start the new run there."
        )


class _TrainingRun:
    """One training run's state and its phases; ``train`` drives it (prepare, then loop)."""

    def __init__(self, cfg: Config, device: torch.device, run_dir: Path, rank: int, world: int) -> None:
        self.cfg, self.device, self.run_dir = cfg, device, run_dir
        self.rank, self.world, self.is_main = rank, world, rank == 0
        self.config_yaml = to_yaml(cfg)
        self.generator = torch.Generator()
        self.stop = _StopRequest()

    # ---- build, restore, data, step --------------------------------------------------------------

    def prepare(self, resuming: bool) -> None:
        from dida.data import build_uda_datasets
        from dida.data.loader import build_train_loader
        from dida.uda.step import build_step

        cfg = self.cfg
        seed_everything(cfg.run.seed + self.rank, cfg.run.deterministic)
        self.state = build_training_state(cfg, self.device)
        self.state.meta["world_size"] = self.world
        if resuming:
            self.restore()
        train_set, self.val_set = build_uda_datasets(cfg.data, seed=cfg.run.seed)
        self.dataset_sizes = (len(train_set.source), len(train_set.target), len(self.val_set))
        self.loader = build_train_loader(
            train_set, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
            start_iter=self.state.iteration, rank=self.rank, world_size=self.world,
            pin_memory=cfg.data.pin_memory and self.device.type == "cuda", seed=cfg.run.seed,
        )
        if cfg.train.compile:
            for module in (self.state.student, self.state.teacher, *self.state.terms.values()):
                if module is not None:
                    compile_models(module, backend=cfg.train.compile_backend, mode=cfg.train.compile_mode)
        self.ddp = None
        if self.world > 1 and cfg.train.distributed == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # BatchNorm statistics stay per process (no SyncBN, no buffer broadcast), as without DDP.
            self.ddp = DistributedDataParallel(
                self.state.student, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        self.step = build_step(cfg.uda, student=self.state.student, teacher=self.state.teacher,
                               terms=self.state.terms, ddp=self.ddp)
        self.writer = MetricWriter(self.run_dir, max_iters=cfg.train.max_iters, start_iter=self.state.iteration,
                                   enabled=self.is_main)
        self.visualizer = DebugVisualizer(self.run_dir / "debug")
        self.best = _best_eval(self.run_dir / "eval.jsonl") if resuming else None
        self._saved_at: int | None = None
        self.writer.line(self.banner(resuming))

    def restore(self) -> None:
        """Continue from the newest complete checkpoint (``latest.pth``, or an ``iter_N.pth`` a kill -9 left
        unlinked, which is then linked); drop log rows written after it (a kill -9 between log and save)."""
        path = resume_checkpoint(self.run_dir)
        restore_training_state(path, self.state)
        if self.is_main:
            if path.name != "latest.pth":
                link_checkpoint(path, self.run_dir / "latest.pth")
            for name in ("metrics.jsonl", "eval.jsonl"):
                _truncate_log(self.run_dir / name, self.state.iteration)
            print(f"Resuming {self.run_dir} from iteration {self.state.iteration}.", flush=True)

    def banner(self, resuming: bool) -> str:
        """What this run is: versions, device, run folder, model, method, schedule, data."""
        from dida import __version__
        from dida.uda.terms import enabled_terms

        cfg, m, t, d = self.cfg, self.cfg.model, self.cfg.train, self.cfg.data
        params = sum(p.numel() for p in self.state.student.parameters())
        threads = f" ({torch.get_num_threads()} threads)" if self.device.type == "cpu" else ""
        gpu = f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else ""
        method = ("self-training" if cfg.uda.self_training else "source only") + (
            f" + {', '.join(enabled_terms(cfg))}" if enabled_terms(cfg) else "")
        n_src, n_tgt, n_val = self.dataset_sizes
        start = f"resuming from iteration {self.state.iteration}" if resuming else "starting at iteration 0"
        return "\n".join([
            f"dida {__version__}, torch {torch.__version__}, device {self.device}{gpu}{threads}, "
            f"{self.world} process(es)" + (f" ({cfg.train.distributed})" if self.world > 1 else ""),
            f"run directory: {self.run_dir} (config.yaml, train.log, metrics.jsonl, eval.jsonl, checkpoints)",
            f"model: {m.segmentor} on {m.backbone}, {m.num_classes} classes, {params:,} parameters; "
            f"pretrained: {m.pretrained or 'none (random initialisation)'}",
            f"method: {method}",
            f"schedule: {t.max_iters} iterations, batch {d.batch_size} per domain and process, crops "
            f"{d.source.crop_size[0]}x{d.source.crop_size[1]}, lr {cfg.optim.lr:g}, amp {t.amp}, "
            f"compile {'on' if t.compile else 'off'}, seed {cfg.run.seed}",
            f"data: source {d.source.kind} {d.source.root} ({n_src} images), target {d.target.kind} "
            f"{d.target.root} {d.target.split} ({n_tgt}), val {d.val.kind} {d.val.split} ({n_val}, "
            f"{cfg.eval.mode} inference)",
            (f"checkpoints every {t.checkpoint_interval} iterations" if t.checkpoint_interval
             else "a checkpoint at the end") + f" (keep {t.keep_last or 'all'}"
            f"{' and the best by mIoU' if t.keep_best else ''}), "
            + (f"evaluation every {t.eval_interval} iterations" if t.eval_interval else "no evaluation")
            + f"; {start}",
        ])

    def models(self) -> dict[str, torch.nn.Module]:
        out: dict[str, torch.nn.Module] = {"model": self.state.student}
        if self.state.teacher is not None:
            out["ema_model"] = self.state.teacher.model
        out.update(self.state.terms)
        return out

    # ---- checkpoints, evaluation -----------------------------------------------------------------

    def save(self) -> Path | None:
        """Write ``iter_N.pth`` (once per iteration) and point ``latest.pth`` at it; returns its path."""
        if not self.is_main:
            return None
        it = self.state.iteration
        if self._saved_at == it:
            return self.run_dir / f"iter_{it}.pth"
        try:
            path = write_checkpoint(self.run_dir, it, training_state_dict(self.state, self.config_yaml),
                                    self.cfg.train.keep_last)
            self._saved_at = it
            return path
        except OSError as e:
            last = list_checkpoints(self.run_dir)
            kept = f"the previous checkpoint {last[-1][1]} is intact" if last else "no earlier checkpoint exists"
            raise CheckpointError(
                f"{self.run_dir / f'iter_{it}.pth'}: writing the checkpoint failed ({e}); {kept}. Free disk "
                "space or fix the folder's permissions, then continue with --resume.") from e

    def evaluate(self) -> bool:
        """Evaluate the student on the validation split; True when its mIoU is the best so far."""
        from dida.engine.evaluate import evaluate

        cfg, it = self.cfg, self.state.iteration
        improved = False
        if self.is_main:
            metrics = evaluate(self.state.student, self.val_set, device=self.device, mode=cfg.eval.mode,
                               crop_size=tuple(cfg.eval.crop_size), stride=tuple(cfg.eval.stride),
                               batched_slide=cfg.eval.batched_slide, amp=cfg.train.amp,
                               num_classes=cfg.model.num_classes, progress=False, max_images=cfg.eval.max_images)
            self.writer.log_eval(it, metrics, self.run_dir, class_names(cfg.model.num_classes))
            miou = float(metrics["mIoU"])
            if not math.isnan(miou) and (self.best is None or miou > self.best[0]):
                self.best, improved = (miou, it), True
        dist_utils.barrier()
        self.state.student.train()
        return improved

    # ---- one iteration ---------------------------------------------------------------------------

    def next_batch(self, data_iter: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """The next batch on the device; unreadable samples are counted against ``data.max_bad_samples``."""
        it, bad_files, limit = self.state.iteration, self.state.meta["bad_files"], self.cfg.data.max_bad_samples
        try:
            batch = next(data_iter)
        except DidaError as e:
            self.save()
            raise DataError(f"{e} (training stopped at iteration {it}; checkpoint written to "
                            f"{self.run_dir / 'latest.pth'}; fix the data, then --resume)") from None
        except Exception:
            if self.stop.requested:  # the loader workers got the same SIGTERM and are gone: stop here
                self.save()
                raise self._stopped(it) from None
            raise
        for f in batch.pop("bad_files", []) or []:
            # distinct files count against max_bad_samples (one bad file may be drawn often)
            new = [x for x in (f if isinstance(f, list) else [f]) if x not in bad_files]
            bad_files.extend(new)
            if self.is_main and new:
                print(f"warning: skipped unreadable sample(s) {', '.join(new)} (replaced by other samples; "
                      f"{len(bad_files)} of data.max_bad_samples={limit})", file=sys.stderr, flush=True)
        if len(bad_files) > limit:
            self.save()
            raise DataError(
                f"{len(bad_files)} unreadable samples (more than data.max_bad_samples={limit}); training "
                f"stopped at iteration {it}. Files:\n  " + "\n  ".join(sorted(set(bad_files))))
        return _to_device(batch, self.device, self.cfg.train.channels_last)

    def run_step(self, batch: dict[str, Any]) -> tuple[Any, float]:
        """Learning rate, then the step with its per-phase backward passes; returns (output, lr)."""
        cfg, it, state = self.cfg, self.state.iteration, self.state
        torch.manual_seed(iteration_seed(cfg.run.seed, it, self.rank))
        self.generator.manual_seed(iteration_seed(cfg.run.seed, it, self.rank) + 1)
        o = cfg.optim
        lr = set_learning_rates(state.optimizer, it, max_iters=cfg.train.max_iters, warmup_iters=o.warmup_iters,
                                warmup_ratio=o.warmup_ratio, power=o.power, min_lr=o.min_lr)
        state.optimizer.zero_grad(set_to_none=True)
        scaler = state.scaler

        def backward(loss: torch.Tensor) -> None:
            (scaler.scale(loss) if scaler is not None else loss).backward()

        debug = self.is_main and cfg.train.debug_img_interval > 0 and it % cfg.train.debug_img_interval == 0
        with autocast(self.device, cfg.train.amp):
            out = self.step(batch, it, generator=self.generator, backward=backward, debug=debug)
        return out, lr

    def first_step(self, batch: dict[str, Any]) -> tuple[Any, float]:
        """``run_step`` for the first iteration of this process: a model that cannot run on the configured
        inputs (shapes the checks in ``dida.config.validate`` do not foresee) is a configuration error, in one
        line; ``--debug`` shows the traceback."""
        try:
            return self.run_step(batch)
        except (RuntimeError, ValueError, IndexError) as e:
            text = str(e).strip()
            if "out of memory" in text.lower() or "can't allocate memory" in text:
                raise
            first = (text.splitlines() or [""])[0][:300]
            raise ConfigError(
                f"the first training step failed with this configuration ({type(e).__name__}: {first}). The "
                "model cannot run on these inputs: check model.* and data.*.crop_size / img_scale "
                "(dida train --help-config), or re-run with --debug for the traceback.") from e

    def apply_gradients(self, losses: dict[str, torch.Tensor]) -> None:
        """Average gradients over ranks, check them, clip, step the optimizer (or skip a non-finite step).

        The check is on the gradients, with one host synchronisation: a loss that is NaN by design and
        adds no gradient (``uda.feature_distance.empty_mask=nan``, as the reference) is logged and the
        other losses' gradients are applied. With fp16, overflowing gradients of finite losses are the
        gradient scaler's business (it skips the step and lowers the scale).
        """
        state, o, it = self.state, self.cfg.optim, self.state.iteration
        params = [p for p in state.student.parameters() if p.grad is not None]
        if self.ddp is None:  # DistributedDataParallel averaged them during the last backward
            dist_utils.all_reduce_gradients(params)
        if state.scaler is not None:
            state.scaler.unscale_(state.optimizer)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        loss_ok = torch.stack([torch.isfinite(v).all() for v in losses.values()]).all()
        flags = torch.stack([torch.isfinite(norm).to(loss_ok.device), loss_ok]).tolist()  # the one sync
        bad = not flags[0] and (state.scaler is None or not flags[1])
        if bad:
            self._nonfinite(losses, it)
            return
        if o.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, o.grad_clip, norm)
        if state.scaler is not None:
            state.scaler.step(state.optimizer)
            state.scaler.update()
        else:
            state.optimizer.step()

    def _nonfinite(self, losses: dict[str, torch.Tensor], it: int) -> None:
        names = [k for k, v in losses.items() if not bool(torch.isfinite(v).all())] or ["gradients"]
        if self.cfg.train.skip_nonfinite:
            self.state.optimizer.zero_grad(set_to_none=True)
            if self.is_main:
                print(f"warning: non-finite {', '.join(names)} at iteration {it}; step skipped.",
                      file=sys.stderr, flush=True)
            return
        last = list_checkpoints(self.run_dir)
        where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint yet"
        raise NonFiniteLossError(
            f"non-finite {', '.join(names)} at iteration {it}; {where}. Lower the learning rate or set "
            "train.skip_nonfinite=true to skip such steps.")

    # ---- the loop --------------------------------------------------------------------------------

    def loop(self) -> None:
        t = self.cfg.train
        if self.state.iteration >= t.max_iters:
            self.writer.line(f"{self.run_dir}: this run already finished its {t.max_iters} iterations; nothing "
                             "to do (raise train.max_iters to continue it)." + self._best_line())
            self.writer.close()
            return
        sums: dict[str, torch.Tensor] = {}
        first, n_logged, data_seconds, t_start = self.state.iteration, 0, 0.0, time.perf_counter()
        t_interval = t_start
        data_iter = iter(self.loader)
        self.state.student.train()
        with self.stop.installed():
            try:
                while self.state.iteration < t.max_iters:
                    t_data = time.perf_counter()
                    batch = self.next_batch(data_iter)
                    data_seconds += time.perf_counter() - t_data
                    out, lr = self.first_step(batch) if self.state.iteration == first else self.run_step(batch)
                    self.apply_gradients(out.losses)
                    self.state.iteration += 1
                    it = self.state.iteration
                    for k, v in {**out.losses, **out.stats}.items():
                        sums[k] = sums.get(k, 0) + v.detach().float()
                    n_logged += 1
                    if self.is_main and t.log_interval and (it % t.log_interval == 0 or it == t.max_iters):
                        values = {"lr": lr, **{k: float(v) / n_logged for k, v in sums.items()}}  # one sync
                        now = time.perf_counter()
                        timing = {"time/iter": (now - t_interval) / n_logged, "time/data": data_seconds / n_logged,
                                  "mem/peak_gib": peak_memory_gib(self.device)}
                        self.writer.log(it, values, timing=timing)
                        sums, n_logged, data_seconds, t_interval = {}, 0, 0.0, now
                    if out.debug:
                        self.visualizer(it - 1, out.debug)
                    self._after_iteration(it)
                self.writer.line(f"Finished at iteration {t.max_iters} ({t.max_iters - first} iterations in "
                                 f"{_format_duration(time.perf_counter() - t_start)})." + self._best_line())
            finally:
                self.writer.close()

    def _best_line(self) -> str:
        last = f" Last checkpoint: {self.run_dir / 'latest.pth'}."
        if self.best is None:
            return last
        where = self.run_dir / "best.pth" if self.cfg.train.keep_best else f"iteration {self.best[1]}"
        return f" Best mIoU {100 * self.best[0]:.2f} at iteration {self.best[1]} ({where}).{last}"

    def _after_iteration(self, it: int) -> None:
        t = self.cfg.train
        improved = False
        if t.eval_interval and (it % t.eval_interval == 0 or it == t.max_iters):
            try:
                improved = self.evaluate()
            except Exception:
                self._save_after_failure(it, "the evaluation")
                raise
        if (t.checkpoint_interval and it % t.checkpoint_interval == 0) or it == t.max_iters or (
                improved and t.keep_best) or self.stop.requested:
            path = self.save()
            if improved and t.keep_best and path is not None:
                link_checkpoint(path, self.run_dir / "best.pth")
        if self.stop.requested:
            raise self._stopped(it)

    def _stopped(self, it: int) -> RunStopped:
        """The exception that ends a run stopped by a signal, its checkpoint written."""
        signame = self.stop.requested or "SIGINT"
        return RunStopped(f"{signame} after iteration {it}; checkpoint {self.run_dir / f'iter_{it}.pth'}. Continue "
                          f"with `dida train --resume {self.run_dir}`.", 143 if signame == "SIGTERM" else 130)

    def _save_after_failure(self, it: int, what: str) -> None:
        """Keep the iterations since the last checkpoint when ``what`` fails (it does not change the state)."""
        try:
            path = self.save()
        except DidaError as e:
            print(f"{what} failed at iteration {it}, and so did the checkpoint: {e}", file=sys.stderr, flush=True)
            return
        if path is not None:
            print(f"{what} failed at iteration {it}; the checkpoint {path} keeps the training so far (fix the "
                  f"cause, then `dida train --resume {self.run_dir}`).", file=sys.stderr, flush=True)


def _best_eval(path: Path) -> tuple[float, int] | None:
    """(mIoU, iteration) of the best evaluation recorded in ``eval.jsonl``, or None."""
    import json

    best = None
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                miou, it = float(row["mIoU"]), int(row["iter"])
            except (ValueError, KeyError, TypeError):
                continue
            if not math.isnan(miou) and (best is None or miou > best[0]):
                best = (miou, it)
    return best


def _format_duration(seconds: float) -> str:
    h, rem = divmod(int(seconds), 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"

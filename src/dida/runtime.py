"""Devices and mixed precision: the one place that maps ``--device`` / ``run.device`` names to devices and
``--amp`` / ``train.amp`` settings to autocast dtypes."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from dida.errors import ConfigError

__all__ = [
    "AMP_DTYPES", "MAX_PROCESSES", "amp_dtype", "autocast", "compile_models", "ignore_interrupts",
    "inference_precision", "resolve_device",
]

# The most worker processes a command starts (--nproc, data.num_workers): more is a typo that would fork
# thousands of processes.
MAX_PROCESSES = 256

# "off" runs in float32 (TF32 matmuls where the backend allows them).
AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of an AMP setting ("off" -> None).

    Raises:
        ConfigError: an unknown setting.
    """
    try:
        return AMP_DTYPES[amp]
    except KeyError:
        raise ConfigError(f"amp must be one of {', '.join(AMP_DTYPES)}; got '{amp}'.") from None


def autocast(device: torch.device | str, amp: str = "off") -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``amp`` in {"bf16", "fp16"} on ``device``; a null context for "off"."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | torch.device | None = "auto", *, key: str = "--device") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is checked and returned.

    Only devices that can run a model are accepted: ``cpu``, ``cuda`` / ``cuda:N`` (N an existing GPU) and
    ``mps`` where PyTorch has it; ``meta`` and the like are refused.

    Args:
        key: how the command line or the configuration names the setting (``--device``, ``run.device``).

    Raises:
        ConfigError: a name that is not a device, or a device this machine does not have.
    """
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpu = "--device cpu" if key.startswith("-") else f"{key}=cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"{key} '{name}': not a device name ({e}). Use cpu, cuda, cuda:N or auto.") from None
    if device.type == "cpu" and device.index not in (None, 0):
        raise ConfigError(f"{key} '{name}': the CPU has no index; use cpu.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key} {name}: CUDA is not available on this machine. Use {cpu}.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{key} {name}: this machine has {torch.cuda.device_count()} GPU(s) "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}).")
    elif device.type == "mps":
        if not _mps_available():
            raise ConfigError(f"{key} {name}: Apple's MPS is not available on this machine. Use {cpu}.")
    elif device.type != "cpu":
        raise ConfigError(f"{key} '{name}': dida runs models on cpu, cuda, cuda:N or mps, not {device.type}.")
    return device


def ignore_interrupts() -> None:
    """Initializer of worker pools: Ctrl-C reaches the main process alone, which stops the pool and reports it
    in one line (workers would each print a ``KeyboardInterrupt`` traceback)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def compile_models(module: torch.nn.Module, *, backend: str, mode: str | None) -> int:
    """``torch.compile`` in place every segmentor inside ``module`` (its forward, and its ``predict`` when the
    model has its own); state-dict names are unchanged. Returns how many segmentors were compiled.

    Shapes are static in training (fixed crops), so each compiled graph is built once per input size.
    """
    from dida.models.base import BaseSegmentor

    count = 0
    for m in module.modules():
        if isinstance(m, BaseSegmentor) and not getattr(m, "_dida_compiled", False):
            m.compile(backend=backend, mode=mode)
            if type(m).predict is not BaseSegmentor.predict:
                m.predict = torch.compile(m.predict, backend=backend, mode=mode)  # type: ignore[method-assign]
            m._dida_compiled = True
            count += 1
    return count


def inference_precision(model: torch.nn.Module, amp: str) -> tuple[torch.nn.Module, str]:
    """A model for inference at ``amp``: with "bf16" its weights are cast to bfloat16 once (no per-forward
    casts, no float32 master copy needed: nothing is trained) and the returned setting is "off" (the inputs
    follow the weights' dtype in ``dida.models.inference``); other settings leave the model as it is."""
    amp_dtype(amp)
    if amp == "bf16":
        return model.to(torch.bfloat16), "off"
    return model, amp

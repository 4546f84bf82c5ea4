"""torchrun / DDP helpers, guarded so that single-process CPU runs need none of it."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

from dida.runtime import resolve_device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_pref: str = "auto") -> torch.device:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1); pick the device.

    ``device_pref`` is resolved by ``dida.runtime.resolve_device``; a CUDA device without an index is
    this rank's ``LOCAL_RANK`` GPU. NCCL on CUDA, gloo on CPU. Returns the device this rank uses.
    """
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, key="run.device")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if ws > 1 and not is_distributed():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=30),
        )
    return device


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank hold rank ``src``'s parameters and buffers."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def all_reduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average gradients over ranks (one flat buffer per dtype/device). No-op when not distributed.

    The DACS step runs several forwards and backwards per iteration, which DDP's reducer does not
    support; averaging the accumulated gradients once before ``optimizer.step`` is equivalent.
    """
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for g in grads:
        buckets.setdefault((g.dtype, g.device), []).append(g)
    ws = world_size()
    for bucket in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(ws)
        offset = 0
        for g in bucket:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()

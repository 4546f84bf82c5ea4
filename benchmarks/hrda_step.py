"""HRDA training-step cost: the HRDA and the MIC(HRDA) step, each with and without activation checkpointing of
the backbone (``model.hrda.checkpoint_backbone``), ms/iteration and peak memory, side by side.

    python -m benchmarks.hrda_step [--backbone mit_b0] [--size 256] [--batch 2] [--iters 3]
                                   [--device cpu|cuda] [--amp off|bf16]

Each variant is the preset (``gta2cs_hrda``, ``gta2cs_mic_hrda``) with the model, crop and block sizes below,
built like ``dida.engine.train.build_training_state`` (student, EMA teacher, the frozen ImageNet model of the
feature distance, AdamW; the same seed, so the same initial weights); one timed iteration is what the loop
does: zero_grad, the step with its per-phase backward passes (source + FD, mixed, masked), optimizer step.
The batch is random normalised images with labels in 64-px blocks and the presets' pseudo-label validity
mask (margins scaled to the crop).

Defaults: on CUDA the reference's size, MiT-B5, 1024x1024 crops, 512x512 detail crops, 64-px MIC blocks,
batch 2, bf16 autocast; on CPU a reduced one, MiT-B0 (decoder 256 as the preset), 256x256 crops, 128x128
detail crops, 16-px blocks (16 per side as the reference), batch 2, float32.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during one iteration above what was allocated before
it (activations, gradients, transients; the models and AdamW moments exist already); on CPU each variant runs
2 iterations in a fresh subprocess and the increase of the maximum RSS over its value once the models exist
is reported (AdamW moments included).
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

# name -> (preset, checkpoint_backbone); KEYS: the command-line names of the subprocess variants
VARIANTS = {
    "hrda": ("gta2cs_hrda", False),
    "hrda + checkpointing": ("gta2cs_hrda", True),
    "mic(hrda)": ("gta2cs_mic_hrda", False),
    "mic(hrda) + checkpointing": ("gta2cs_mic_hrda", True),
}
KEYS = {"hrda": "hrda", "hrda-ckpt": "hrda + checkpointing", "mic": "mic(hrda)",
        "mic-ckpt": "mic(hrda) + checkpointing"}
REFERENCE_CROP = 1024  # the margins [30, 240, 30, 30] are for 1024-row crops


def make_batch(batch: int, size: int, num_classes: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Source/target images ``[B, 3, S, S]``, labels in 64-px blocks ``[B, S, S]`` (so that the feature
    distance's 64-px cells at the context scale are pure) and the validity mask ``[B, S, S]`` uint8."""
    from dida.data.transforms import margin_mask

    g = torch.Generator().manual_seed(seed)
    cells = max(1, size // 64)
    lab = torch.randint(0, num_classes, (batch, cells, cells), generator=g)
    lab = lab.repeat_interleave(size // cells, 1).repeat_interleave(size // cells, 2)
    margins = [round(m * size / REFERENCE_CROP) for m in (30, 240, 30, 30)]
    valid = torch.from_numpy(margin_mask(size, size, margins)).expand(batch, size, size).contiguous()
    return {
        "img": torch.randn(batch, 3, size, size, generator=g).to(device),
        "label": lab.to(device),
        "target_img": torch.randn(batch, 3, size, size, generator=g).to(device),
        "valid_pseudo_mask": valid.to(device),
    }


class Trainer:
    """One variant: models, optimizer and step, built like the engine does from the preset."""

    def __init__(self, args: argparse.Namespace, preset: str, checkpointing: bool, device: torch.device) -> None:
        from dida.config import load_config
        from dida.engine.train import build_training_state
        from dida.uda.step import build_step

        s, d = args.size, args.detail
        cfg = load_config(preset, [
            f"model.backbone={args.backbone}", "model.pretrained=null", f"model.hrda.detail_crop_size=[{d},{d}]",
            f"model.hrda.checkpoint_backbone={checkpointing}", f"data.source.crop_size=[{s},{s}]",
            f"data.target.crop_size=[{s},{s}]", f"uda.mic.block_size={args.block}", f"run.device={device}"])
        torch.manual_seed(0)  # same initial weights for every variant
        state = build_training_state(cfg, device)
        self.student, self.optimizer = state.student, state.optimizer
        self.step = build_step(cfg.uda, student=self.student, teacher=state.teacher, terms=state.terms,
                               amp=args.amp, device_type=device.type)
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


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """CPU memory of one variant in this fresh process: max-RSS increase over 2 iterations."""
    device = torch.device(args.device)
    preset, checkpointing = VARIANTS[KEYS[args.child]]
    batch = make_batch(args.batch, args.size, 19, device)
    trainer = Trainer(args, preset, checkpointing, device)
    base = max_rss_bytes()
    for _ in range(2):
        trainer(batch)
    return {"peak_bytes": max_rss_bytes() - base}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.set_defaults(amp=None)  # bf16 on CUDA, off on CPU
    p.add_argument("--backbone", default=None, help="default mit_b0 on cpu, mit_b5 on cuda")
    p.add_argument("--size", type=int, default=None, help="crop size S (S x S); default 256 cpu, 1024 cuda")
    p.add_argument("--detail", type=int, default=None, help="detail crop; default S / 2")
    p.add_argument("--block", type=int, default=None, help="MIC block size; default S / 16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=3, help="timed iterations per variant")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory subprocesses")
    p.add_argument("--total-iters", type=int, default=40000, help="for the run-time estimate")
    p.add_argument("--child", choices=tuple(KEYS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.amp = args.amp or ("bf16" if cuda else "off")
    args.backbone = args.backbone or ("mit_b5" if cuda else "mit_b0")
    args.size = args.size or (1024 if cuda else 256)
    args.detail = args.detail or args.size // 2
    args.block = args.block or max(1, args.size // 16)
    threads = setup_threads(args.threads)
    if args.child:
        print(json.dumps(_child(args)))
        return 0

    device = torch.device(args.device)
    peaks: dict[str, int | None] = {}
    if not cuda:
        # First, while this process is small (a child inherits its parent's maximum RSS over fork+exec).
        for key, name in KEYS.items():
            if args.no_memory:
                peaks[name] = None
                continue
            child = ["--child", key, "--device", args.device, "--amp", args.amp, "--threads", str(threads),
                     "--backbone", args.backbone, "--size", str(args.size), "--detail", str(args.detail),
                     "--block", str(args.block), "--batch", str(args.batch)]
            peaks[name] = run_child("benchmarks.hrda_step", child)["peak_bytes"]
    batch = make_batch(args.batch, args.size, 19, device)
    trainers = {name: Trainer(args, preset, ckpt, device) for name, (preset, ckpt) in VARIANTS.items()}
    if cuda:
        for name, tr in trainers.items():
            for _ in range(args.warmup):
                tr(batch)
            with cuda_peak(device) as box:
                tr(batch)
            peaks[name] = box["peak_bytes"]
        times = time_interleaved({k: (lambda tr=tr: tr(batch)) for k, tr in trainers.items()}, device,
                                 args.iters, warmup=0)
    else:
        times = time_interleaved({k: (lambda tr=tr: tr(batch)) for k, tr in trainers.items()}, device,
                                 args.iters, warmup=args.warmup)
    sync(device)

    med = {k: median(v) for k, v in times.items()}
    rows = []
    for name, t in med.items():
        base = med[name.replace(" + checkpointing", "")]
        peak = peaks.get(name)
        plain = peaks.get(name.replace(" + checkpointing", ""))
        rel = "" if peak is None or plain is None or name == name.replace(" + checkpointing", "") else \
            f" ({peak / plain:.2f}x)"
        rows.append([
            name, f"{1000 * t:.0f}", f"{min(times[name]) * 1000:.0f}-{max(times[name]) * 1000:.0f}",
            f"{t / base:.2f}x", "n/a" if peak is None else f"{peak / 2**20:.0f}{rel}",
            f"{t * args.total_iters / 3600:.1f}",
        ])
    mem = "CUDA max_memory_allocated above resident" if cuda else "max RSS increase, fresh process"
    print(machine_description(device))
    print_table(
        f"HRDA training step, {args.backbone} + DAFormer head + scale attention, batch {args.batch} x "
        f"{args.size}x{args.size} (detail {args.detail}x{args.detail}, MIC blocks {args.block}), {args.device}, "
        f"amp={args.amp}, {threads} threads, median of {args.iters} (round-robin, {args.warmup} warm-up)",
        ["step", "ms/iter", "range ms", "time vs no checkpointing", f"peak MiB ({mem})",
         f"h per {args.total_iters // 1000}k iters"],
        rows,
        [] if cuda else [("CUDA max_memory_allocated: not measured (no GPU in this run); "
                          "run with --device cuda for MiT-B5, 1024x1024, batch 2, bf16.")],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

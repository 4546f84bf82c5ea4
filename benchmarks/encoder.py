"""Encoder speed and memory: dida's MiT vs the Hugging Face ``transformers`` SegFormer encoder (same weights),
and the foundation ViT backbones (DINOv2 / DINOv3 through ``transformers`` + dida's pyramid) at the same input.

    python -m benchmarks.encoder [--backbone mit_b5] [--size 1024 512] [--iters 3] [--device cpu|cuda]
                                 [--amp off|bf16] [--threads N] [--compile]
                                 [--vit dinov2_vits14 dinov2_vitb14 ...] [--no-memory]

Builds dida's MiT (random reference initialisation from a fixed generator), copies its weights into a
``transformers`` ``SegformerModel`` of the same architecture through the key table of
``dida.checkpoint`` (``mit_to_hf_state_dict``, checked to load strictly and to map back with
``hf_to_mit_state_dict``), and times a forward of batch 1 at ``--size`` (W H) for each, round-robin
(so that a change of machine load hits both alike), in inference mode.

Fairness: ``transformers`` uses LayerNorm eps 1e-5 in the blocks and after each stage where the
reference MiT (and dida) use 1e-6; the benchmark sets those HF LayerNorms to 1e-6 so that both compute
the same function (the eps does not change the cost). The maximum absolute difference of the four
stage outputs is reported in float32 (TF32 off): it must be at the float32 rounding level (~1e-5),
which proves both run the same computation. With ``--amp bf16`` the timed forwards run under autocast
and the bf16 difference is reported too.

Foundation rows (``--vit``, default DINOv2 ViT-S/14 and ViT-B/14; ``--vit`` alone for none): dida's
``FoundationViT`` (random weights: the cost does not depend on them) timed in the same round-robin, i.e. the
padded image through ``transformers``' ViT, the 14/16 resampling and the simple feature pyramid; "vs dida MiT"
is the MiT row's time over theirs (< 1: slower). Their output equality with ``transformers``' own models is
tested in ``tests/models/test_dinov2.py``.

Peak memory of one forward (inference mode): on CUDA ``max_memory_allocated`` above the memory held before it;
on CPU the peak-RSS increase over the built model, in a fresh subprocess per encoder (``--no-memory`` skips
them).

Without ``transformers`` installed, the HF column and the foundation rows are skipped with a message.
"""

from __future__ import annotations

import argparse
import contextlib
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
    time_interleaved,
)
from dida.errors import ConfigError
from dida.runtime import autocast

DEFAULT_VITS = ("dinov2_vits14", "dinov2_vitb14")


def build_hf(backbone: Any) -> Any:
    """A ``transformers.SegformerModel`` with the architecture and weights of dida's ``backbone``."""
    from transformers import SegformerConfig, SegformerModel

    from dida.models.mit_weights import hf_to_mit_state_dict, mit_to_hf_state_dict

    cfg = SegformerConfig(
        num_channels=3, num_encoder_blocks=4, depths=list(backbone.depths),
        sr_ratios=list(backbone.sr_ratios),
        hidden_sizes=list(backbone.embed_dims), num_attention_heads=list(backbone.num_heads),
        patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], mlp_ratios=[4, 4, 4, 4], hidden_act="gelu",
        drop_path_rate=backbone.drop_path_rate, layer_norm_eps=1e-6, reshape_last_stage=True,
    )
    cfg._attn_implementation = "sdpa"
    model = SegformerModel(cfg)
    sd = mit_to_hf_state_dict(backbone.state_dict(), layout="v5", prefix="")
    model.load_state_dict(sd, strict=True)
    back, _ = hf_to_mit_state_dict(model.state_dict())
    ref = backbone.state_dict()
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref), "key table round trip"
    # transformers uses nn.LayerNorm's default eps (1e-5) in the blocks and stage norms; the reference
    # MiT uses 1e-6 there (the patch embedding and the spatial-reduction norms are 1e-5 in both).
    for stage in model.stages:
        stage.layer_norm.eps = 1e-6
        for blk in stage.blocks:
            blk.layernorm_before.eps = 1e-6
            blk.layernorm_after.eps = 1e-6
    return model


def hf_features(model: Any, img: torch.Tensor) -> list[torch.Tensor]:
    """The four stage maps ``[B, C_s, H/2^(s+1), W/2^(s+1)]`` of a ``SegformerModel``."""
    out = model(pixel_values=img, output_hidden_states=True, return_dict=True)
    return list(out.hidden_states)


@contextlib.contextmanager
def _exact_fp32() -> Any:
    """TF32 off (CUDA matmuls and convolutions) for the difference check."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(max |a - b| over the four maps, max |a|)."""
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b)), "output shapes differ"
    diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))
    scale = max(float(x.float().abs().max()) for x in a)
    return diff, scale


def build_vit(name: str) -> Any:
    """dida's foundation backbone ``name`` (``FoundationViT``), transformers' random initialisation."""
    from dida.config import ModelCfg
    from dida.models.foundation import build_foundation_vit

    torch.manual_seed(0)
    return build_foundation_vit(ModelCfg(backbone=name))


def params_m(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f}"


def build_encoder(key: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """``(module, forward)`` of one encoder: ``"dida"``, ``"transformers"`` (MiT's SegFormer twin) or a ViT name."""
    from dida.models.mit import build_mit

    if key in ("dida", "transformers"):
        torch.manual_seed(0)
        mit = build_mit(args.backbone, init=False)
        mit.init_weights(torch.Generator().manual_seed(0))
        if key == "dida":
            return mit, mit
        hf = build_hf(mit)
        return hf, lambda x: hf_features(hf, x)
    vit = build_vit(key)
    return vit, vit


def _status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` (None off Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """CPU peak memory of one encoder's forward in this fresh process: the peak-RSS increase over the RSS
    after building it. Linux: the peak (``VmHWM``) is reset first (``/proc/self/clear_refs``), so that the
    temporaries of building a model (e.g. the SegFormer twin's weight copies) do not hide the forward's
    peak; elsewhere the max-RSS increase."""
    import gc

    device = torch.device(args.device)
    module, fn = build_encoder(args.child, args)
    module.to(device).eval()
    w, h = args.size
    img = torch.randn(args.batch, 3, h, w, generator=torch.Generator().manual_seed(1)).to(device)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base, use_hwm = _status_bytes("VmRSS"), True
    except OSError:
        base, use_hwm = max_rss_bytes(), False
    with torch.inference_mode(), autocast(device, args.amp):
        fn(img)
    peak = _status_bytes("VmHWM") if use_hwm else max_rss_bytes()
    return {"peak_bytes": (peak or 0) - (base or 0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--backbone", default="mit_b5")
    p.add_argument("--size", type=int, nargs=2, default=(1024, 512), metavar=("W", "H"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=3, help="timed forwards per encoder")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(dida encoder)")
    p.add_argument("--no-before", action="store_true",
                   help="skip the row without channels-last convolution weights")
    p.add_argument("--vit", nargs="*", default=list(DEFAULT_VITS),
                   help="foundation backbones to time beside MiT (default %(default)s)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    threads = setup_threads(args.threads)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    device = torch.device(args.device)
    peaks = _peaks_cpu(args, threads) if device.type == "cpu" and not args.no_memory else {}

    ours = build_encoder("dida", args)[0].to(device).eval()
    try:
        hf = build_hf(ours).to(device).eval()
        hf_error = None
    except ImportError as e:
        hf, hf_error = None, str(e)
    vits: dict[str, Any] = {}
    vit_error = None
    for name in args.vit:
        try:
            vits[name] = build_vit(name).to(device).eval()
        except ConfigError as e:  # transformers missing (one line naming the dida[hf] extra)
            vit_error = str(e)

    g = torch.Generator().manual_seed(1)
    w, h = args.size
    img = torch.randn(args.batch, 3, h, w, generator=g).to(device)

    # ---- equality of the outputs (float32, TF32 off) ----
    with torch.inference_mode(), _exact_fp32():
        ref = ours(img)
        diff32 = max_abs_diff(ref, hf_features(hf, img)) if hf is not None else None
        del ref

    fns: dict[str, Any] = {}

    def run(f):
        def call() -> None:
            with torch.inference_mode(), autocast(device, args.amp):
                f(img)
        return call

    fns["dida"] = run(ours)
    if not args.no_before:
        from dida.models import mit

        def nchw_convs(x: torch.Tensor) -> list[torch.Tensor]:
            # the "before" row: PyTorch's default convolutions (NCHW weights) on the token maps
            fast = mit.conv_channels_last
            mit.conv_channels_last = lambda conv, inp: conv(inp)
            try:
                return ours(x)
            finally:
                mit.conv_channels_last = fast

        fns["dida, NCHW conv weights (before)"] = run(nchw_convs)
    if hf is not None:
        fns["transformers"] = run(lambda x: hf_features(hf, x))
    if args.compile:
        fns["dida + torch.compile"] = run(torch.compile(ours))
    for name, vit in vits.items():
        fns[name] = run(vit)
    modules = {"dida": ours, "transformers": hf, **vits}
    if device.type == "cuda" and not args.no_memory:
        for name, module in modules.items():
            if module is None:
                continue
            forward = (lambda x, m=module: hf_features(m, x)) if name == "transformers" else module
            with torch.inference_mode(), autocast(device, args.amp), cuda_peak(device) as box:
                forward(img)
            peaks[name] = box["peak_bytes"]
    diff_amp = None
    if args.amp != "off" and hf is not None:
        with torch.inference_mode(), autocast(device, args.amp):
            diff_amp = max_abs_diff(ours(img), hf_features(hf, img))

    times = time_interleaved(fns, device, args.iters, warmup=max(args.warmup, 2 if args.compile else 1))
    med = {k: median(v) for k, v in times.items()}
    rows = []
    for name, t in med.items():
        mit_row = name.startswith(("dida", "transformers"))
        ratio = f"{med['transformers'] / t:.2f}x" if "transformers" in med and mit_row else "n/a"
        module = modules.get(name)
        peak = peaks.get(name)
        rows.append([name, params_m(module) if module is not None else "", f"{1000 * t:.1f}",
                     f"{args.batch / t:.3f}", f"{med['dida'] / t:.2f}x", ratio,
                     "n/a" if peak is None else f"{peak / 2**20:.0f}",
                     f"{min(times[name]) * 1000:.1f}-{max(times[name]) * 1000:.1f}"])
    notes = []
    if vit_error is not None:
        notes.append(f"foundation rows skipped: {vit_error}")
    if hf is None:
        notes.append(f"transformers column skipped: {hf_error} (pip install transformers to compare)")
    else:
        notes.append(f"max |dida - transformers| over the 4 stage outputs, float32: {diff32[0]:.2e} "
                     f"(outputs up to {diff32[1]:.1f})")
        if diff_amp is not None:
            notes.append(f"max |dida - transformers| under {args.amp} autocast: {diff_amp[0]:.2e}")
    mem = "CUDA max_memory_allocated above resident" if device.type == "cuda" else "peak RSS increase, fresh process"
    print(machine_description(device))
    print_table(
        f"Encoder {args.backbone}, input {w}x{h}, batch {args.batch}, {args.device}, amp={args.amp}, "
        f"{threads} threads, inference mode, median of {args.iters} (round-robin, {args.warmup} warm-up)",
        ["encoder", "params M", "ms/forward", "images/s", "vs dida MiT", "speed vs transformers",
         f"peak MiB ({mem})", "range ms"], rows, notes)
    return 0


def _peaks_cpu(args: argparse.Namespace, threads: int) -> dict[str, int]:
    """Peak memory per encoder, each in a fresh subprocess, started while this process is still small
    (Linux keeps a process's maximum RSS across fork+exec)."""
    out: dict[str, int] = {}
    for key in ("dida", "transformers", *args.vit):
        child = ["--child", key, "--backbone", args.backbone, "--size", *map(str, args.size), "--batch",
                 str(args.batch), "--device", args.device, "--amp", args.amp, "--threads", str(threads)]
        try:
            out[key] = run_child("benchmarks.encoder", child)["peak_bytes"]
        except RuntimeError as e:  # e.g. transformers missing: that row has no memory figure
            print(f"peak memory of {key} not measured: {str(e).splitlines()[-1]}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())

"""Encoder speed: dida's MiT vs the Hugging Face ``transformers`` SegFormer encoder, same weights.

    python -m benchmarks.encoder [--backbone mit_b5] [--size 1024 512] [--iters 3] [--device cpu|cuda]
                                 [--amp off|bf16] [--threads N] [--compile]

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

Without ``transformers`` installed, the HF column is skipped with a message.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import torch

from benchmarks._common import (
    add_common_args,
    machine_description,
    median,
    print_table,
    setup_threads,
    time_interleaved,
)
from dida.runtime import autocast


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
    args = p.parse_args(argv)
    threads = setup_threads(args.threads)
    device = torch.device(args.device)

    from dida.models.mit import build_mit

    torch.manual_seed(0)
    ours = build_mit(args.backbone, init=False)
    ours.init_weights(torch.Generator().manual_seed(0))
    ours = ours.to(device).eval()
    try:
        hf = build_hf(ours).to(device).eval()
        hf_error = None
    except ImportError as e:
        hf, hf_error = None, str(e)

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
    diff_amp = None
    if args.amp != "off" and hf is not None:
        with torch.inference_mode(), autocast(device, args.amp):
            diff_amp = max_abs_diff(ours(img), hf_features(hf, img))

    times = time_interleaved(fns, device, args.iters, warmup=max(args.warmup, 2 if args.compile else 1))
    med = {k: median(v) for k, v in times.items()}
    rows = []
    for name, t in med.items():
        ratio = f"{med['transformers'] / t:.2f}x" if "transformers" in med else "n/a"
        rows.append([name, f"{1000 * t:.1f}", f"{args.batch / t:.3f}", ratio,
                     f"{min(times[name]) * 1000:.1f}-{max(times[name]) * 1000:.1f}"])
    notes = []
    if hf is None:
        notes.append(f"transformers column skipped: {hf_error} (pip install transformers to compare)")
    else:
        notes.append(f"max |dida - transformers| over the 4 stage outputs, float32: {diff32[0]:.2e} "
                     f"(outputs up to {diff32[1]:.1f})")
        if diff_amp is not None:
            notes.append(f"max |dida - transformers| under {args.amp} autocast: {diff_amp[0]:.2e}")
    print(machine_description(device))
    print_table(
        f"Encoder {args.backbone}, input {w}x{h}, batch {args.batch}, {args.device}, amp={args.amp}, "
        f"{threads} threads, inference mode, median of {args.iters} (round-robin, {args.warmup} warm-up)",
        ["encoder", "ms/forward", "images/s", "speed vs transformers", "range ms"], rows, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

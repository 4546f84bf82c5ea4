"""The ``dida`` command line: argparse subcommands only; each one calls ``dida.commands.<name>:main``.

Every user-facing error (``DidaError``) is printed as one clear message, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence


def _add_runtime(p: argparse.ArgumentParser) -> None:
    from dida.runtime import AMP_DTYPES

    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (GPU when available)")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off", help="mixed precision")


def _add_hrda_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hrda-out", choices=("lr", "hr", "att"),
                   help="HRDA checkpoints only: the context branch alone (lr), the detail branch alone (hr), "
                        "or the scale attention written as an 8-bit image, x255 (att)")


def build_parser() -> argparse.ArgumentParser:
    from dida.commands.bank import bank_kinds
    from dida.data.kinds import convertible_kinds

    from dida import __version__

    parser = argparse.ArgumentParser(
        prog="dida",
        description="Unsupervised domain-adaptive semantic segmentation in plain PyTorch: DAFormer, DIDA, HRDA, "
                    "MIC and foundation backbones, alone or combined.",
    )
    parser.add_argument("--version", action="version", version=f"dida {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ---- train
    p = sub.add_parser("train", help="train source-only, DAFormer or DIDA from a preset or YAML")
    p.add_argument("config", nargs="?", help="preset name (e.g. gta2cs_dida) or YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_iters=1000 run.seed=1")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from latest.pth")
    p.add_argument("--help-config", action="store_true", help="print every config key with its default")
    p.add_argument("--list-presets", action="store_true", help="print the shipped presets")
    p.set_defaults(_entry="dida.commands.train:main")

    # ---- test
    p = sub.add_parser("test", help="evaluate a checkpoint (mIoU) on the validation split")
    p.add_argument("config", help="preset, YAML, run directory or exported model folder (uses its config.yaml), "
                                  "or the hf://ORG/REPO of an export")
    p.add_argument("checkpoint", nargs="?",
                   help="dida or mmcv DIDA/DAFormer checkpoint, exported folder, or hf://ORG/REPO[/FILE][@REV] "
                        "(default: CONFIG's own: an exported folder, an hf:// export, RUN_DIR/latest.pth)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.val.split=val")
    p.add_argument("--which", choices=("model", "ema_model"), default="model", help="student or EMA teacher")
    p.add_argument("--data-root", help="override data.val.root")
    p.add_argument("--out", help="output folder (default: <checkpoint dir>/test)")
    p.add_argument("--mode", choices=("whole", "slide"), help="override eval.mode")
    p.add_argument("--save-preds", action="store_true", help="also write predictions")
    p.add_argument("--format", choices=("color", "trainid", "cityscapes", "all"), default="all",
                   help="what --save-preds writes: colour PNGs, train-id PNGs, Cityscapes label-id PNGs")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--allow-pickle", action="store_true", help="trust the checkpoint (unsafe unpickling)")
    _add_hrda_out(p)
    _add_runtime(p)
    p.set_defaults(_entry="dida.commands.test:main")

    # ---- infer
    p = sub.add_parser("infer", help="predict on your own images (overlays + label maps)")
    p.add_argument("checkpoint", help="checkpoint file, exported folder, or hf://ORG/REPO[/FILE][@REV]")
    p.add_argument("inputs", help="an image file or a folder of images")
    p.add_argument("--out", default="predictions", help="output folder")
    p.add_argument("--opacity", type=float, default=0.5, help="palette opacity of the overlay")
    p.add_argument("--config", help="preset or YAML describing the model (default: from the checkpoint)")
    p.add_argument("--which", choices=("model", "ema_model"), default="model")
    p.add_argument("--img-scale", type=int, nargs=2, default=(1024, 512), metavar=("LONG", "SHORT"))
    p.add_argument("--recursive", action="store_true", help="also predict images in sub-folders")
    p.add_argument("--allow-pickle", action="store_true", help="trust the checkpoint (unsafe unpickling)")
    _add_hrda_out(p)
    _add_runtime(p)
    p.set_defaults(_entry="dida.commands.infer:main")

    # ---- convert
    p = sub.add_parser("convert", help="label ids -> train ids and rare-class statistics")
    p.add_argument("dataset", choices=convertible_kinds())
    p.add_argument("root", help="dataset root (e.g. data/gta)")
    p.add_argument("--nproc", type=int, default=4, help="parallel worker processes")
    p.add_argument("--force", action="store_true", help="re-convert files that already exist")
    p.set_defaults(_entry="dida.commands.convert:main")

    # ---- bank
    p = sub.add_parser("bank", help="instance-bank tools")
    bank_sub = p.add_subparsers(dest="bank_command", metavar="ACTION", required=True)
    b = bank_sub.add_parser("build", help="build a class-balanced bank from a source-trained model")
    b.add_argument("checkpoint")
    b.add_argument("--data", required=True, help="source dataset root (converted)")
    b.add_argument("--dataset", choices=bank_kinds(), default="gta")
    b.add_argument("--size", type=int, default=300, help="number of bank entries K")
    b.add_argument("--out", required=True, help="folder for f_buffer_s.npz and l_buffer_s.npz")
    b.add_argument("--config", help="preset or YAML describing the model (default: from the checkpoint)")
    b.add_argument("--which", choices=("model", "ema_model"), default="model")
    b.add_argument("--max-images", type=int, help="stop after this many images")
    b.add_argument("--img-scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                   help="test-pipeline resize (default: the source pipeline's, e.g. 1280 720 for gta)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--allow-pickle", action="store_true")
    _add_runtime(b)
    b.set_defaults(_entry="dida.commands.bank:main")

    # ---- synth
    p = sub.add_parser("synth", help="generate the synthetic domain-shift benchmark (GTA + Cityscapes layouts)")
    p.add_argument("root", help="output folder; gets gta/ and cityscapes/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-source", type=int, default=200)
    p.add_argument("--num-target-train", type=int, default=200)
    p.add_argument("--num-val", type=int, default=50)
    p.add_argument("--size", type=int, nargs=2, default=(512, 256), metavar=("WIDTH", "HEIGHT"))
    p.add_argument("--nproc", type=int, default=2)
    p.set_defaults(_entry="dida.commands.synth:main")

    # ---- convert-checkpoint
    p = sub.add_parser("convert-checkpoint", help="turn an mmcv DIDA/DAFormer checkpoint into a dida one")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--allow-pickle", action="store_true", help="trust the input (unsafe unpickling)")
    p.set_defaults(_entry="dida.commands.convert_checkpoint:main")

    # ---- weights
    p = sub.add_parser("weights", help="the model zoo: list known weights, fetch them, verify a file")
    p.set_defaults(_entry="dida.commands.weights:main")
    w_sub = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    w_sub.add_parser("list", help="known weights: where they live, reported mIoU, the preset evaluating them")
    w = w_sub.add_parser("get", help="download NAME (or an hf:// reference) into the Hugging Face cache, or print "
                                     "where to download it by hand (exit status 1)")
    w.add_argument("name", help="a name of `dida weights list`, or hf://ORG/REPO[/FILE][@REV]")
    w = w_sub.add_parser("verify", help="check a file placed by hand: sha256, safe loading, the model it holds")
    w.add_argument("file", help="checkpoint file, exported folder or hf:// reference")
    w.add_argument("--name", help="the zoo entry it should be (checks its sha256 and model)")
    w.add_argument("--allow-pickle", action="store_true", help="trust the file (unsafe unpickling)")

    # ---- export
    p = sub.add_parser("export", help="write a Hub-ready model folder (safetensors, config, model card); upload it")
    p.add_argument("source", help="run directory (its latest.pth and config.yaml) or a checkpoint file")
    p.add_argument("--to", help="the folder to write")
    p.add_argument("--to-hub", metavar="ORG/REPO", help="upload the folder to this Hub repository")
    p.add_argument("--checkpoint", help="checkpoint of the run directory to export (default latest.pth)")
    p.add_argument("--config", help="preset or YAML, for a checkpoint that holds no configuration")
    p.add_argument("--metrics", help="dida test metrics.json for the model card (default RUN_DIR/test/metrics.json)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --to folder / upload to an existing Hub repository")
    p.add_argument("--private", action="store_true", help="create the Hub repository private")
    p.add_argument("--message", help="commit message of the upload")
    p.add_argument("--allow-pickle", action="store_true", help="trust the checkpoint (unsafe unpickling)")
    p.set_defaults(_entry="dida.commands.export:main")

    # ---- demo
    p = sub.add_parser("demo", help="the embedded default: synth data, train 3 methods, evaluate, report")
    p.add_argument("--out", default="work_dirs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, help="override the iterations of each preset")
    p.add_argument("--quick", action="store_true", help="a tiny smoke version (for tests)")
    p.set_defaults(_entry="dida.commands.demo:main")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from dida.errors import DidaError

    parser = build_parser()
    args = parser.parse_args(argv)
    module_name, func_name = args._entry.split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args) or 0)
    except DidaError as e:
        print(f"dida {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dida {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

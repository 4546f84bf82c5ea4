"""The ``dida`` command line: argparse subcommands only; each one calls ``dida.commands.<name>:main``.

``main`` is the one guard around every command: an expected failure (``DidaError``; a full disk, a read-only or
missing folder and other ``OSError``s; out of memory) is printed as one line naming the file or key and the fix,
exit status 2; Ctrl-C / a stopped run exit with 130 (143 for SIGTERM); a closed stdout (``dida ... | head``)
ends quietly. Anything else is a bug: one line saying so, exit status 1. ``--debug`` (before or after the
command) shows the traceback instead. Dotted overrides (``key=value``) may come before or after the options.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any


class _Help(argparse.RawDescriptionHelpFormatter):
    """An option's help ends with its default (unless it states it, or there is none); descriptions and examples
    keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "(default" in text or default is None or default is False or default == argparse.SUPPRESS or \
                not action.option_strings:
            return text
        shown = " ".join(str(v) for v in default) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"


_DEBUG_HELP = "on an error, show the Python traceback instead of the one-line message"


def _command(sub: Any, name: str, summary: str, examples: str = "", **kw: Any) -> argparse.ArgumentParser:
    epilog = f"examples:\n{examples}" if examples else None
    p = sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                       epilog=epilog, formatter_class=_Help, **kw)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    p.set_defaults(_parser=p)
    return p


def _add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what} (without it an existing output is an error)")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    from dida.runtime import AMP_DTYPES

    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (a GPU when there is one)")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off",
                   help="mixed precision of the forward: off (float32), bf16, or fp16 (CUDA)")


def _add_model_source(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--config", help=f"preset or YAML describing the model and its {what} (default: the run's "
                                    "configuration stored in the checkpoint)")
    p.add_argument("--which", choices=("model", "ema_model"), default="model",
                   help="the student (what the reference evaluates) or the EMA teacher")
    p.add_argument("--allow-pickle", action="store_true",
                   help="trust a checkpoint that needs arbitrary Python objects (unsafe unpickling)")


def _add_hrda_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hrda-out", choices=("lr", "hr", "att"),
                   help="HRDA checkpoints only: the context branch alone (lr), the detail branch alone (hr), "
                        "or the scale attention written as an 8-bit image, x255 (att)")


def _train_parser(sub: Any) -> None:
    p = _command(sub, "train", "train a model from a preset or YAML (source only, DAFormer, DIDA, HRDA, MIC, ...)",
                 "  dida train --list-presets\n"
                 "  dida train gta2cs_dida model.pretrained=hf://nvidia/mit-b5 run.dir=work_dirs/my_dida\n"
                 "  dida train synth_daformer uda.mic.enabled=true train.max_iters=1000\n"
                 "  dida train --resume work_dirs/my_dida")
    p.add_argument("config", nargs="?", help="preset name (see --list-presets) or YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_iters=1000 run.seed=1 "
                                                "(every key: --help-config)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where its latest.pth "
                                                       "stopped")
    p.add_argument("--force", action="store_true",
                   help="start a new run in a run.dir whose config.yaml holds another configuration and no "
                        "checkpoint (an earlier run that failed before its first checkpoint); it is replaced")
    p.add_argument("--help-config", action="store_true",
                   help="print every configuration key with its default, allowed values and a description")
    p.add_argument("--list-presets", action="store_true", help="print the shipped presets, one line each")
    p.set_defaults(_entry="dida.commands.train:main")


def _test_parser(sub: Any) -> None:
    p = _command(sub, "test", "evaluate a checkpoint on the validation split (mIoU per class)",
                 "  dida test work_dirs/my_dida                      # the run's latest.pth and its config\n"
                 "  dida test gta2cs_dida DIDA_gta2cs/latest.pth     # a released mmcv checkpoint\n"
                 "  dida test hf://ORG/my-dida --which ema_model --save-preds --format cityscapes")
    p.add_argument("config", help="preset, YAML, run directory or exported model folder (uses its config.yaml), "
                                  "or the hf://ORG/REPO of an export")
    p.add_argument("checkpoint", nargs="?",
                   help="dida or mmcv checkpoint, exported folder, or hf://ORG/REPO[/FILE][@REV] "
                        "(default: CONFIG's own: an exported folder, an hf:// export, RUN_DIR/latest.pth)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.val.root=data/cityscapes")
    p.add_argument("--which", choices=("model", "ema_model"), default="model",
                   help="the student (what the reference evaluates) or the EMA teacher")
    p.add_argument("--data-root", help="the validation dataset's root (overrides data.val.root)")
    p.add_argument("--out", help="output folder (default: <checkpoint dir>/test)")
    _add_force(p, "the metrics.json, config.yaml, iou.png and predictions of an earlier test in --out")
    p.add_argument("--mode", choices=("whole", "slide"), help="inference mode (overrides eval.mode)")
    p.add_argument("--save-preds", action="store_true", help="also write the predictions")
    p.add_argument("--format", choices=("color", "trainid", "cityscapes", "all"), default="all",
                   help="what --save-preds writes: colour PNGs, train-id PNGs, Cityscapes label-id PNGs")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--allow-pickle", action="store_true",
                   help="trust a checkpoint that needs arbitrary Python objects (unsafe unpickling)")
    _add_hrda_out(p)
    _add_runtime(p)
    p.set_defaults(_entry="dida.commands.test:main")


def _infer_parser(sub: Any) -> None:
    p = _command(sub, "infer", "predict on your own images (palette overlays and train-id label maps)",
                 "  dida infer work_dirs/my_dida/latest.pth my_images/ --out predictions --opacity 0.5\n"
                 "  dida infer hf://ORG/my-dida street.jpg --img-scale 2048 1024")
    p.add_argument("checkpoint", help="checkpoint file, exported folder, or hf://ORG/REPO[/FILE][@REV]")
    p.add_argument("inputs", help="an image file or a folder of images")
    p.add_argument("--out", default="predictions", help="output folder")
    _add_force(p, "the overlays and label maps of the same images already in --out")
    p.add_argument("--opacity", type=float, default=0.5, help="palette opacity of the overlay, in [0, 1]")
    p.add_argument("--img-scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                   help="keep-ratio test resize (default: the model's, data.val.img_scale of its configuration)")
    p.add_argument("--mode", choices=("whole", "slide"),
                   help="inference mode (default: the model's, eval.mode of its configuration)")
    p.add_argument("--recursive", action="store_true", help="also predict the images in sub-folders")
    _add_model_source(p, "test settings")
    _add_hrda_out(p)
    _add_runtime(p)
    p.set_defaults(_entry="dida.commands.infer:main")


def _data_parsers(sub: Any) -> None:
    from dida.commands.bank import bank_kinds
    from dida.data.kinds import convertible_kinds

    p = _command(sub, "convert", "convert label ids to train ids and write the rare-class statistics",
                 "  dida convert gta data/gta --nproc 8\n  dida convert cityscapes data/cityscapes")
    p.add_argument("dataset", choices=convertible_kinds(), help="the dataset's kind")
    p.add_argument("root", help="dataset root (e.g. data/gta)")
    p.add_argument("--nproc", type=int, default=4, help="parallel worker processes")
    p.add_argument("--force", action="store_true", help="re-convert files that already exist")
    p.set_defaults(_entry="dida.commands.convert:main")

    p = sub.add_parser("bank", help="instance-bank tools (DIDA)", formatter_class=_Help)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    bank_sub = p.add_subparsers(dest="bank_command", metavar="ACTION", required=True)
    b = _command(bank_sub, "build", "build a class-balanced instance bank from a source-trained model",
                 "  dida bank build work_dirs/gta2cs_source_only/latest.pth --size 300 --out embedding_cache/mine")
    b.add_argument("checkpoint", help="checkpoint of a (source-only) model, exported folder or hf:// reference")
    b.add_argument("--out", required=True, help="folder for f_buffer_s.npz and l_buffer_s.npz")
    _add_force(b, "an f_buffer_s.npz / l_buffer_s.npz already in --out")
    b.add_argument("--data", help="source dataset root, converted (default: data.source.root of the checkpoint's "
                                  "configuration)")
    b.add_argument("--dataset", choices=bank_kinds(),
                   help="the source dataset's kind (default: data.source.kind of the checkpoint's configuration, "
                        "else gta)")
    b.add_argument("--size", type=int, default=300, help="number of bank entries K")
    b.add_argument("--max-images", type=int, help="use at most this many images")
    b.add_argument("--img-scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                   help="keep-ratio resize (default: the model's training scale, data.source.img_scale of its "
                        "configuration; else the dataset kind's reference scale)")
    b.add_argument("--seed", type=int, default=0, help="seed of the image order and the reservoir sampling")
    _add_model_source(b, "training data")
    _add_runtime(b)
    b.set_defaults(_entry="dida.commands.bank:main")

    p = _command(sub, "synth", "generate the synthetic domain-shift benchmark (GTA + Cityscapes layouts)",
                 "  dida synth data/synth --size 256 128")
    p.add_argument("root", help="output folder; gets gta/ and cityscapes/")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated scenes")
    p.add_argument("--num-source", type=int, default=200, help="source (GTA-like) images")
    p.add_argument("--num-target-train", type=int, default=200, help="target (Cityscapes-like) training images")
    p.add_argument("--num-val", type=int, default=50, help="target validation images")
    p.add_argument("--size", type=int, nargs=2, default=(512, 256), metavar=("WIDTH", "HEIGHT"),
                   help="image size")
    p.add_argument("--nproc", type=int, default=2, help="parallel worker processes")
    _add_force(p, "the gta/ and cityscapes/ folders already under ROOT (they are deleted first)")
    p.set_defaults(_entry="dida.commands.synth:main")


def _weights_parsers(sub: Any) -> None:
    p = _command(sub, "convert-checkpoint", "turn an mmcv DAFormer / DIDA checkpoint into a dida checkpoint",
                 "  dida convert-checkpoint DIDA_gta2cs/latest.pth work_dirs/dida_gta2cs.pth")
    p.add_argument("input", help="the mmcv checkpoint")
    p.add_argument("output", help="the dida checkpoint to write")
    _add_force(p, "an existing OUTPUT (never the INPUT itself)")
    p.add_argument("--allow-pickle", action="store_true", help="trust the input (unsafe unpickling)")
    p.set_defaults(_entry="dida.commands.convert_checkpoint:main")

    p = _command(sub, "weights", "the model zoo: list known weights, fetch them, verify a file",
                 "  dida weights list\n  dida weights get mit_b5\n  dida weights verify latest.pth --name dida_gta2cs")
    p.set_defaults(_entry="dida.commands.weights:main")
    w_sub = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    _command(w_sub, "list", "known weights: where they live, reported mIoU, the preset evaluating them")
    w = _command(w_sub, "get", "download NAME (or an hf:// reference) into the Hugging Face cache, or print where "
                               "to download it by hand (exit status 1)")
    w.add_argument("name", help="a name of `dida weights list`, or hf://ORG/REPO[/FILE][@REV]")
    w = _command(w_sub, "verify", "check a file placed by hand: sha256, safe loading, the model it holds")
    w.add_argument("file", help="checkpoint file, exported folder or hf:// reference")
    w.add_argument("--name", help="the zoo entry it should be (checks its sha256 and model)")
    w.add_argument("--allow-pickle", action="store_true", help="trust the file (unsafe unpickling)")

    p = _command(sub, "export", "write a Hub-ready model folder (safetensors, config, model card); upload it",
                 "  dida export work_dirs/my_dida --to exports/my-dida\n"
                 "  dida export work_dirs/my_dida --to exports/my-dida --to-hub ORG/my-dida")
    p.add_argument("source", help="run directory (its latest.pth and config.yaml) or a checkpoint file")
    p.add_argument("--to", help="the folder to write")
    p.add_argument("--to-hub", metavar="ORG/REPO", help="upload the folder to this Hub repository")
    p.add_argument("--checkpoint", help="checkpoint of the run directory to export (default: latest.pth)")
    p.add_argument("--config", help="preset or YAML, for a checkpoint that holds no configuration")
    p.add_argument("--metrics", help="dida test metrics.json for the model card (default: RUN_DIR/test/metrics.json)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --to folder / upload to an existing Hub repository")
    p.add_argument("--private", action="store_true", help="create the Hub repository private")
    p.add_argument("--message", help="commit message of the upload")
    p.add_argument("--allow-pickle", action="store_true", help="trust the checkpoint (unsafe unpickling)")
    p.set_defaults(_entry="dida.commands.export:main")


def build_parser() -> argparse.ArgumentParser:
    from dida import __version__

    parser = argparse.ArgumentParser(
        prog="dida", formatter_class=_Help,
        description="Unsupervised domain-adaptive semantic segmentation in plain PyTorch: DAFormer, DIDA, HRDA, "
                    "MIC and foundation backbones, alone or combined.",
        epilog="`dida COMMAND --help` describes each command. Start with `make demo` (README.md).",
    )
    parser.add_argument("--version", action="version", version=f"dida {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _train_parser(sub)
    _test_parser(sub)
    _infer_parser(sub)
    _data_parsers(sub)
    _weights_parsers(sub)
    p = _command(sub, "demo", "the embedded default: generate the synthetic benchmark, train and evaluate five "
                              "methods, write a report",
                 "  dida demo                      # about 10 minutes on 2 CPU cores\n"
                 "  dida demo --seed 1 --out work_dirs/demo_s1")
    p.add_argument("--out", default="work_dirs/demo", help="output folder (data, runs, report.md)")
    p.add_argument("--seed", type=int, default=0, help="training seed (the benchmark data is fixed)")
    p.add_argument("--iters", type=int, help="override the iterations of each method (default: the presets' 300)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke version (for tests)")
    _add_force(p, "folders under --out that are not this demo's own data and runs (other data, unfinished or "
                  "differently configured runs, unrelated files in a method's run folder)")
    p.set_defaults(_entry="dida.commands.demo:main")
    return parser


# Expected operating-system failures: what to do about each (the message names the path).
_OS_FIXES: dict[int, str] = {
    errno.ENOSPC: "free some space, or write elsewhere",
    errno.EDQUOT: "free some space, or write elsewhere",
    errno.EROFS: "choose an output path on a writable disk",
    errno.EACCES: "fix the permissions, or choose another path",
    errno.EPERM: "fix the permissions, or choose another path",
    errno.ENOTDIR: "a part of this path is a file, not a folder: fix the path",
    errno.EISDIR: "give a file path, not a folder",
    errno.EEXIST: "remove it, or choose another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "fix the symbolic links of the path",
    errno.EMFILE: "raise the limit (ulimit -n), or lower data.num_workers",
    errno.ENFILE: "lower data.num_workers",
    errno.EIO: "check the disk",
    errno.ENOMEM: "lower data.batch_size, the image scale or data.num_workers",
    errno.ENOTEMPTY: "remove it, or choose another path",
    errno.EXDEV: "choose a path on the same file system",
    errno.ETXTBSY: "wait for the program using it",
    errno.ESTALE: "check the network file system",
    errno.ECONNREFUSED: "check the network",
    errno.ETIMEDOUT: "check the network",
}


def _os_message(e: OSError) -> str | None:
    """One line for an expected ``OSError``, or None when it is not one of ``_OS_FIXES``."""
    fix = _OS_FIXES.get(e.errno or -1)
    if fix is None:
        return None
    where = f"{e.filename}: " if e.filename else ""
    also = f" (and {e.filename2})" if e.filename2 else ""
    return f"{where}{e.strerror or os.strerror(e.errno or 0)}{also}; {fix}."


def _memory_message(e: BaseException) -> str | None:
    text = str(e)
    first = (text.strip().splitlines() or [""])[0][:200]
    if isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower():
        return (f"out of memory ({type(e).__name__}: {first}); lower data.batch_size or the image / crop sizes, "
                "use --amp bf16 on a GPU, or check the input image sizes.")
    return None


def _end_progress_bars() -> None:
    """Close the progress bars an error interrupted, so that the error starts on a line of its own."""
    import contextlib

    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or ()):
        with contextlib.suppress(Exception):  # a half-closed bar must not hide the error
            bar.close()


def _closed_stdout() -> int:
    """The reader of stdout went away (``dida ... | head``): end quietly, like a tool killed by SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; dotted overrides after the options (``dida test RUN --limit 1 eval.mode=slide``) join the
    command's overrides, as if they came before."""
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if overrides and hasattr(args, "overrides"):
        args.overrides = [*(args.overrides or []), *overrides]
    else:
        unknown = extra
    if unknown:
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


# Numeric options shared by several commands: their legal range (None: no bound) and why, checked before the
# command runs (each command checks its own other options).
_OPTION_RANGES: dict[str, tuple[int | None, int | None, str]] = {
    "seed": (0, None, "numpy's generators take non-negative seeds"),
}


def _check_option_ranges(args: argparse.Namespace) -> None:
    from dida.errors import ConfigError

    for name, (low, high, why) in _OPTION_RANGES.items():
        value = getattr(args, name, None)
        if value is None or isinstance(value, bool) or not isinstance(value, int):
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            shown = f">= {low}" if high is None else (f"<= {high}" if low is None else f"in [{low}, {high}]")
            raise ConfigError(f"--{name.replace('_', '-')} must be {shown} ({why}), got {value}.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dida COMMAND ...``; returns the exit status (see the module docstring)."""
    from dida.errors import DidaError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except BrokenPipeError:  # --help into a closed pipe
        return _closed_stdout()
    debug = bool(getattr(args, "debug", False))
    name = f"dida {args.command}"
    module_name, func_name = args._entry.split(":")
    try:
        _check_option_ranges(args)
        func = getattr(importlib.import_module(module_name), func_name)
        code = int(func(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _closed_stdout()
    except KeyboardInterrupt as e:
        if debug:
            raise
        _end_progress_bars()
        stopped = str(e).strip()
        print(f"{name}: stopped: {stopped}" if stopped else f"{name}: interrupted.", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))
    except DidaError as e:
        if debug:
            raise
        _end_progress_bars()
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the one guard: expected failures in one line, the rest as a bug
        if debug:
            raise
        _end_progress_bars()
        line = (_os_message(e) if isinstance(e, OSError) else None) or _memory_message(e)
        if line is not None:
            print(f"{name}: error: {line}", file=sys.stderr)
            return 2
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"{name}: bug: unexpected {type(e).__name__}: {first}. This is a bug in dida (or an input it does "
              "not check yet): re-run with --debug for the traceback, and please report it.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

"""``dida weights list | get NAME | verify FILE``: the model zoo, fetching from the Hub, checking a file by hand."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dida.errors import CheckpointError
from dida.hub import cache_dir, cached_path, file_sha256, is_hub_ref, resolve
from dida.zoo import ZooEntry, find_entry, load_zoo

__all__ = ["main"]

_ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip")


def _where(entry: ZooEntry) -> str:
    if entry.hub is None:
        return "by hand (Google Drive)" if "drive.google" in entry.url else "by hand"
    try:
        cached = cached_path(entry.hub) is not None
    except Exception:
        cached = False
    return f"{entry.hub}{' [cached]' if cached else ''}"


def _list() -> int:
    zoo = load_zoo()
    rows = [("name", "what", "reported", "preset", "where", "sha256")]
    for e in zoo.values():
        preset = e.preset or ("model.pretrained" if e.kind == "backbone" else "-")
        rows.append((e.name, e.title, e.scores(), preset, _where(e), "known" if e.sha256_known else "unknown"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"\nhf:// weights: `dida weights get NAME` downloads them into {cache_dir()} (HF_HOME / HF_HUB_CACHE);"
          "\nthe others: `dida weights get NAME` says where to download them and how to check them."
          "\nReported: the paper's mean over 3 seeds; released: the released checkpoint's own number.")
    return 0


def _by_hand(entry: ZooEntry) -> int:
    """Instructions for a file that only exists outside the Hub; exit status 1 (nothing was fetched)."""
    print(f"{entry.name}: {entry.title}. Reported: {entry.scores()}.")
    print("It is not on the Hugging Face Hub; download it by hand:")
    archive = entry.file if entry.file.endswith(_ARCHIVES) else None
    print(f"  1. open {entry.url}" + (f" and save {entry.file}" if entry.file != "unknown" else ""))
    inner = entry.checkpoint or entry.file
    if archive:
        extract = f"unzip {archive} -d work_dirs/" if archive.endswith(".zip") else f"tar -xzf {archive} -C work_dirs/"
        print(f"  2. {extract}   (the checkpoint is {inner} inside it)")
        path = f"work_dirs/{inner}"
    else:
        print(f"  2. extract the download under work_dirs/ (the checkpoint is its {inner})")
        path = f"work_dirs/<extracted folder>/{Path(inner).name}"
    print(f"  3. dida weights verify {path} --name {entry.name}")
    if entry.preset:
        print(f"  4. dida test {entry.preset} {path}")
    checksum = entry.sha256 if entry.sha256_known else "unknown (none was published)"
    print(f"sha256 of the download: {checksum}; `verify` always checks that the file loads with the safe "
          "loader and holds the expected model.")
    look = f"search for the file name {entry.file} or ask" if entry.file != "unknown" else "ask"
    print(f"If the link is dead: {look} the authors (source: {entry.source}); a copy from anywhere passes "
          "`verify` only if it loads safely and holds the expected model.")
    return 1


def _get(args: argparse.Namespace) -> int:
    entry = None if is_hub_ref(args.name) else find_entry(args.name)
    ref = args.name if entry is None else entry.hub
    if ref is None:
        assert entry is not None
        return _by_hand(entry)
    path = resolve(ref)
    if path.is_file():
        digest = file_sha256(path)
        if entry is not None and entry.sha256_known and digest != entry.sha256:
            raise CheckpointError(
                f"{path}: sha256 {digest} is not the published {entry.sha256} of {entry.name}; refusing it. "
                "Delete it and fetch it again."
            )
        print(f"{ref} -> {path}\n  sha256: {digest}")
    else:
        print(f"{ref} -> {path} (a dida export)")
    use = f"model.pretrained={ref}" if entry is None or entry.kind == "backbone" else f"dida test {entry.preset} {ref}"
    print(f"  use it as {ref} (e.g. {use}); it is read from the cache from now on, also with HF_HUB_OFFLINE=1.")
    return 0


def _load_strictly(ckpt: Mapping[str, Any], info: dict[str, Any], source: str) -> list[str]:
    """Build the model the checkpoint describes and load each of its models into it; the names loaded."""
    from dida.checkpoint import load_checkpoint
    from dida.models import build_model

    cfg = info["model_cfg"]
    if cfg is None:
        raise CheckpointError(f"{source}: cannot tell which model this file holds, so it cannot be loaded.")
    cfg.pretrained = None
    model = build_model(cfg)
    names = [n for n in ("model", "ema_model") if n in info["parts"]] or ["weights"]
    for name in names:
        load_checkpoint(model, ckpt, which=name if name != "weights" else "model", source=source)
    return names


def _effective_backbone(cfg: Any) -> Any:
    """The backbone's name, or what it was changed into: a MiT named ``mit_b0`` whose ``model.embed_dims`` /
    ``depths`` / ``num_heads`` override the variant's is not that variant (a zoo check must not pass it)."""
    from dida.models.mit import MIT_VARIANTS

    name = getattr(cfg, "backbone", None)
    variant = MIT_VARIANTS.get(name) if isinstance(name, str) else None
    if variant is None:
        return name
    changed = [f"{key} {list(getattr(cfg, key))}" for key in ("embed_dims", "depths", "num_heads")
               if getattr(cfg, key, None) and list(getattr(cfg, key)) != list(getattr(variant, key))]
    return f"{name} with {', '.join(changed)}" if changed else name


def _check_expect(entry: ZooEntry, info: dict[str, Any], source: str) -> None:
    cfg = info["model_cfg"]
    found = {"format": info["format"], "segmentor": getattr(cfg, "segmentor", None),
             "backbone": _effective_backbone(cfg), "num_classes": getattr(cfg, "num_classes", None)}
    wrong = [f"{k} {found[k]} (expected {v})" for k, v in entry.expect.items() if found[k] != v]
    if wrong:
        raise CheckpointError(f"{source}: not the {entry.title} ({entry.name}): it holds {', '.join(wrong)}.")


def _verify(args: argparse.Namespace) -> int:
    from dida.checkpoint import read_checkpoint
    from dida.checkpoint.describe import describe_checkpoint

    entry = find_entry(args.name) if args.name else None
    path = resolve(args.file)
    print(f"{args.file}" + (f" -> {path}" if str(path) != str(args.file) else ""))
    if path.is_file():
        digest = file_sha256(path)
        if entry is not None and entry.sha256_known:
            if digest != entry.sha256:
                raise CheckpointError(
                    f"{path}: sha256 {digest} is not the published {entry.sha256} of {entry.name}: the file is "
                    "corrupted or another release. Download it again."
                )
            print(f"  sha256:  {digest} (matches the published checksum of {entry.name})")
        else:
            why = f"{entry.name} has no published checksum" if entry is not None else "no --name to compare with"
            print(f"  sha256:  {digest} ({why})")
        if path.name.endswith(_ARCHIVES):
            inner = f" ({entry.checkpoint})" if entry is not None and entry.checkpoint else ""
            print(f"  an archive: extract it and verify the checkpoint inside{inner}.")
            return 0
    ckpt = read_checkpoint(path, allow_pickle=args.allow_pickle)
    info = describe_checkpoint(ckpt)
    print(f"  format:  {info['format']}")
    print("  holds:   " + ", ".join(f"{k} ({n} tensors)" for k, n in info["parts"].items()))
    cfg = info["model_cfg"]
    if cfg is not None:
        arch = cfg.backbone + (f" (embed_dims {cfg.embed_dims}, depths {cfg.depths})" if cfg.embed_dims else "")
        if info["format"] in ("dida", "mmcv", "segmentor"):
            print(f"  model:   {cfg.segmentor} on {arch}, {cfg.num_classes} classes")
        else:
            print(f"  model:   a {arch} backbone's weights (for model.pretrained)")
    if info["iteration"] is not None:
        print(f"  iteration: {info['iteration']}")
    if entry is not None:
        _check_expect(entry, info, str(path))
    loaded = _load_strictly(ckpt, info, str(path))
    print(f"  loads:   {', '.join(loaded)} strictly, with the safe loader"
          + (" (--allow-pickle: unsafe unpickling was allowed)" if args.allow_pickle else ""))
    print(f"OK: {path}" + (f" is the {entry.title}." if entry is not None else " is a usable checkpoint."))
    return 0


def main(args: argparse.Namespace) -> int:
    """``dida weights ACTION``: ``list``, ``get NAME`` or ``verify FILE [--name NAME]``."""
    if args.weights_command == "list":
        return _list()
    if args.weights_command == "get":
        return _get(args)
    if args.weights_command == "verify":
        return _verify(args)
    print(f"unknown action {args.weights_command}", file=sys.stderr)
    return 2

"""The embedded default, end to end on the synthetic domain-shift benchmark (``run_demo``; the ``dida demo``
command is ``dida.commands.demo``).

1. generate the data (``dida synth``; skipped when ``OUT/data`` already holds it with the same
   parameters, judged by its manifest) and convert it (``dida convert``);
2. train the five presets ``synth_source_only``, ``synth_daformer``, ``synth_dida``, ``synth_mic``
   (DAFormer + MIC) and ``synth_mic_dida`` (DIDA + MIC) (a run whose directory already holds the finished
   run of the identical configuration is reused);
3. read each run's final evaluation on the target validation split (``run_dir/eval.jsonl``);
4. print a per-class table and write ``OUT/results.json``, ``OUT/report.md``, ``OUT/predictions.png``
   (input, ground truth and each method's prediction for a few validation images) and ``OUT/iou.png``.

The benchmark data is fixed (generator seed 0, like a real dataset); ``--seed`` is the training seed.
``--quick`` runs a tiny smoke version (tiny images, a handful of iterations) for the tests.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dida.constants import class_names
from dida.data.synthetic import SynthParams, generate, read_manifest
from dida.io import atomic_open, atomic_path
from dida.runtime import resolve_device
from dida.visualize import colorize

METHODS: tuple[str, ...] = ("source_only", "daformer", "dida", "mic", "mic_dida")
METHOD_TITLES = {"source_only": "Source only", "daformer": "DAFormer", "dida": "DIDA", "mic": "DAFormer + MIC",
                 "mic_dida": "DIDA + MIC"}
DATA_SEED = 0
NUM_FIGURE_IMAGES = 3  # at most; fewer when the val split is smaller

# Full demo: the `dida synth` defaults. Quick: tiny images and a few iterations (test smoke run).
FULL_DATA = SynthParams(seed=DATA_SEED, width=256, height=128)
QUICK_DATA = SynthParams(seed=DATA_SEED, num_source=4, num_target_train=4, num_val=2, width=128, height=64)
QUICK_OVERRIDES: tuple[str, ...] = (
    "model.decoder_channels=16",
    "data.source.img_scale=[128,64]", "data.source.crop_size=[64,64]",
    "data.target.img_scale=[128,64]", "data.target.crop_size=[64,64]",
    "data.val.img_scale=[128,64]",
    "data.rcs.min_pixels=0", "data.num_workers=0",
    "uda.pseudo_weight_ignore_top=2", "uda.pseudo_weight_ignore_bottom=15",
    "uda.bank.update_interval=1",
    "optim.warmup_iters=1",
    "train.max_iters=2", "train.eval_interval=2", "train.checkpoint_interval=2", "train.log_interval=1",
    "run.device=cpu",
)


def ensure_data(root: Path, params: SynthParams, nproc: int) -> bool:
    """Generate and convert the benchmark under ``root`` unless it is there; True if (re)made."""
    from dida.data.convert import convert_dataset

    manifest = read_manifest(root)
    converted = all((root / d / "sample_class_stats.json").is_file() for d in ("gta", "cityscapes"))
    if manifest == asdict(params) and converted:
        print(f"dida demo: reusing the synthetic data in {root}", flush=True)
        return False
    if manifest != asdict(params):
        for sub in ("gta", "cityscapes"):  # stale files of other parameters would join the new set
            shutil.rmtree(root / sub, ignore_errors=True)
        print(f"dida demo: generating the synthetic benchmark in {root}", flush=True)
        generate(root, params, nproc=nproc)
    convert_dataset("gta", str(root / "gta"), nproc=nproc, force=True)
    convert_dataset("cityscapes", str(root / "cityscapes"), nproc=nproc, force=True)
    return True


def method_config(method: str, out: Path, data_root: Path, seed: int, iters: int | None, quick: bool) -> Any:
    """The resolved ``Config`` of one method's demo run."""
    from dida.config import load_config

    overrides = list(QUICK_OVERRIDES) if quick else []
    overrides += [
        f"run.dir={out / method}",
        f"run.seed={seed}",
        f"data.source.root={data_root / 'gta'}",
        f"data.target.root={data_root / 'cityscapes'}",
        f"data.val.root={data_root / 'cityscapes'}",
    ]
    if iters is not None:
        overrides += [f"train.max_iters={iters}", f"train.eval_interval={iters}",
                      f"train.checkpoint_interval={iters}"]
    return load_config(f"synth_{method}", overrides)


def _final_eval(run_dir: Path, max_iters: int) -> dict[str, Any] | None:
    path = run_dir / "eval.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    finals = [r for r in records if r.get("iter") == max_iters]
    return finals[-1] if finals else None


def train_or_reuse(cfg: Any) -> tuple[Path, dict[str, Any], float, bool]:
    """Train ``cfg`` (or reuse its finished run); returns (run_dir, final eval record, seconds, reused)."""
    from dida.config import to_yaml
    from dida.engine.train import train

    run_dir = Path(cfg.run.dir)
    max_iters = cfg.train.max_iters
    done = (run_dir / "latest.pth").is_file() and (run_dir / "config.yaml").is_file()
    if done and (run_dir / "config.yaml").read_text() == to_yaml(cfg):
        record = _final_eval(run_dir, max_iters)
        if record is not None:
            return run_dir, record, 0.0, True
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished or differently configured earlier run
    t0 = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t0
    record = _final_eval(run_dir, max_iters)
    if record is None:
        record = _evaluate_run(cfg, run_dir)
        with atomic_open(run_dir / "eval.jsonl", "w") as f:
            f.write(json.dumps(record) + "\n")
    return run_dir, record, seconds, False


def _load_student(cfg: Any, run_dir: Path, device: Any) -> Any:
    from dida.checkpoint import read_checkpoint
    from dida.models import build_model

    model = build_model(cfg.model)
    ckpt = read_checkpoint(run_dir / "latest.pth")
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def _val_dataset(cfg: Any) -> Any:
    from dida.data import build_dataset
    from dida.data.uda import ValDataset

    return ValDataset(build_dataset(cfg.data.val), tuple(cfg.data.val.img_scale))


def _evaluate_run(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """Evaluate the final student when the engine wrote no final record (``train.eval_interval=0``)."""
    from dida.engine.evaluate import evaluate

    device = resolve_device(cfg.run.device)
    model = _load_student(cfg, run_dir, device)
    metrics = evaluate(model, _val_dataset(cfg), device=device, mode=cfg.eval.mode,
                       crop_size=tuple(cfg.eval.crop_size), stride=tuple(cfg.eval.stride), progress=False)
    iou = [None if math.isnan(float(x)) else float(x) for x in np.asarray(metrics["IoU"], dtype=float)]
    return {"iter": cfg.train.max_iters, "mIoU": float(metrics["mIoU"]), "aAcc": float(metrics["aAcc"]),
            "IoU": dict(zip(class_names(cfg.model.num_classes), iou))}


# ------------------------------------------------------------------------------------- figures


def predict_examples(cfgs: dict[str, Any], run_dirs: dict[str, Path], num: int) -> dict[str, Any]:
    """Inputs, ground truths and each method's predictions for the first ``num`` val images (sorted)."""
    import cv2
    import torch

    from dida.models import inference

    first = next(iter(cfgs.values()))
    device = resolve_device(first.run.device)
    val = _val_dataset(first)
    order = sorted(range(len(val)), key=lambda i: str(val.dataset.samples[i][0]))[:num]
    items = [val[i] for i in order]
    examples: dict[str, Any] = {
        "names": [Path(str(it["filename"])).name for it in items],
        "images": [cv2.cvtColor(cv2.imread(str(it["filename"]), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                   for it in items],
        "labels": [np.asarray(it["label"]) for it in items],
        "preds": {},
    }
    for method, cfg in cfgs.items():
        model = _load_student(cfg, run_dirs[method], device)
        preds = []
        for it in items:
            probs = inference(model, it["img"][None].to(device), out_size=np.asarray(it["label"]).shape)
            preds.append(probs.argmax(1)[0].to(torch.uint8).cpu().numpy())
        examples["preds"][method] = preds
    return examples


def plot_predictions(examples: dict[str, Any], path: Path) -> Path:
    """Rows: validation images; columns: input, ground truth, one prediction per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(examples["preds"])
    cols = ["Target image", "Ground truth"] + [METHOD_TITLES.get(m, m) for m in methods]
    rows = len(examples["images"])
    h, w = examples["images"][0].shape[:2]
    cell_w = 3.2
    fig = Figure(figsize=(cell_w * len(cols), cell_w * h / w * rows + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    for r in range(rows):
        panels = [examples["images"][r], colorize(examples["labels"][r])]
        panels += [colorize(examples["preds"][m][r]) for m in methods]
        for c, panel in enumerate(panels):
            ax = fig.add_subplot(rows, len(cols), r * len(cols) + c + 1)
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_iou(results: dict[str, Any], path: Path) -> Path:
    """Grouped per-class IoU bars (one bar per method), mIoU in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(results)
    names = _class_names(results)
    n = len(names)
    width = 0.8 / max(1, len(methods))
    fig = Figure(figsize=(14, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(n)
    for k, m in enumerate(methods):
        vals = [results[m]["IoU"].get(c) for c in names]
        vals = [0.0 if v is None else 100.0 * v for v in vals]
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, vals, width,
               label=f"{METHOD_TITLES.get(m, m)} (mIoU {100 * results[m]['mIoU']:.1f})")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("IoU on target val (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# -------------------------------------------------------------------------------------- report


def _class_names(results: dict[str, Any]) -> list[str]:
    """The classes of the per-class IoU records, in their order (the first method's)."""
    return list(next(iter(results.values()))["IoU"])


def _pct(v: float | None) -> str:
    return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:5.1f}"


def format_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per class, one column per method, mIoU last."""
    methods = list(results)
    head = "| class | " + " | ".join(METHOD_TITLES.get(m, m) for m in methods) + " |"
    sep = "|---|" + "---:|" * len(methods)
    rows = [f"| {c} | " + " | ".join(_pct(results[m]["IoU"].get(c)) for m in methods) + " |"
            for c in _class_names(results)]
    means = " | ".join(f"**{_pct(results[m]['mIoU']).strip()}**" for m in methods)
    rows.append(f"| **mIoU** | {means} |")
    return "\n".join([head, sep, *rows])


def _duration(result: dict[str, Any]) -> str:
    return "reused" if result["reused"] else f"{result['seconds']:.0f} s"


def write_report(out: Path, results: dict[str, Any], info: dict[str, Any]) -> Path:
    data = info["data"]
    lines = [
        "# dida demo: synthetic GTA-like -> Cityscapes-like adaptation",
        "",
        (f"Data: `{info['data_root']}` ({data['num_source']} source, {data['num_target_train']} "
         f"target-train, {data['num_val']} target-val images of {data['width']}x"
         f"{data['height']}; generator seed {data['seed']}). Training seed {info['seed']}, "
         f"{info['iters']} iterations per method{' (quick smoke run)' if info['quick'] else ''}."),
        "",
        "IoU (%) on the target validation split (student model, whole-image inference):",
        "",
        format_table(results),
        "",
        "| method | run dir | train + eval time |",
        "|---|---|---:|",
        *[f"| {METHOD_TITLES.get(m, m)} | `{r['run_dir']}` | {_duration(r)} |" for m, r in results.items()],
        "",
        f"Total wall time: {info['total_seconds']:.0f} s.",
        "",
        "![predictions](predictions.png)",
        "",
        ("Columns: target image, ground truth, then each method's prediction "
         "(Cityscapes palette; black = ignored)."),
        "",
        "![per-class IoU](iou.png)",
        "",
    ]
    path = out / "report.md"
    with atomic_open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def run_demo(out: Path, *, seed: int = 0, iters: int | None = None, quick: bool = False) -> Path:
    """Data, five trainings, evaluation, figures and report under ``out``; returns the report's path.

    Args:
        out: output folder (``out/data``, one run directory per method, the report files).
        seed: training seed of every method.
        iters: iterations per method (default: each preset's).
        quick: the tiny smoke version (tiny images, a handful of iterations).
    """
    t_start = time.perf_counter()
    params = QUICK_DATA if quick else FULL_DATA
    nproc = max(1, min(2, os.cpu_count() or 1))
    data_root = out / "data"

    # ---- data --------------------------------------------------------------------------------
    ensure_data(data_root, params, nproc)

    # ---- train + evaluate each method ----------------------------------------------------------
    cfgs = {m: method_config(m, out, data_root, seed, iters, quick) for m in METHODS}
    results: dict[str, Any] = {}
    run_dirs: dict[str, Path] = {}
    for method, cfg in cfgs.items():
        print(f"dida demo: {METHOD_TITLES[method]} ({cfg.train.max_iters} iterations) -> {cfg.run.dir}",
              flush=True)
        run_dir, record, seconds, reused = train_or_reuse(cfg)
        run_dirs[method] = run_dir
        results[method] = {"mIoU": record["mIoU"], "IoU": record["IoU"], "aAcc": record.get("aAcc"),
                           "run_dir": str(run_dir), "seconds": seconds, "reused": reused}
        print(f"dida demo: {METHOD_TITLES[method]} mIoU {100 * record['mIoU']:.2f}"
              + (" (reused)" if reused else f" in {seconds:.0f} s"), flush=True)

    # ---- figures, numbers, report --------------------------------------------------------------
    examples = predict_examples(cfgs, run_dirs, NUM_FIGURE_IMAGES)
    plot_predictions(examples, out / "predictions.png")
    plot_iou(results, out / "iou.png")
    with atomic_open(out / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    info = {"data_root": str(data_root), "data": asdict(params), "seed": seed, "quick": quick,
            "iters": cfgs["source_only"].train.max_iters, "total_seconds": time.perf_counter() - t_start}
    report = write_report(out, results, info)
    print()
    print(format_table(results))
    print()
    print(f"dida demo: done in {info['total_seconds']:.0f} s. Report: {report} "
          f"(figures {out / 'predictions.png'}, {out / 'iou.png'}; numbers {out / 'results.json'}).")
    return report


__all__ = ["ensure_data", "format_table", "method_config", "run_demo", "train_or_reuse"]

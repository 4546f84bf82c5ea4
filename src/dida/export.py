"""A trained model as a Hugging Face Hub-ready folder (``dida export``), and its upload.

Layout (the names are ``dida.hub.EXPORT_*``)::

    model.safetensors       the student: a segmentor state dict (backbone.*, decode_head.*); what the reference
                            evaluates, and what `dida test` / `dida infer` load by default
    ema_model.safetensors   the EMA teacher, when the run has one (`--which ema_model`)
    config.yaml             the run's resolved configuration: test / infer build the model from it
    dida_export.json        export format version, dida version, source checkpoint, iteration, and for each
                            weights file its sha256, size and tensor count (checked whenever it is read)
    README.md               the model card: method, data, evaluation table, classes, files, use, reproduce

The folder is written beside the destination under a temporary name and renamed into place once complete
and read back identical; an existing destination is replaced only with ``force``, and only then.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dida.errors import CheckpointError, ConfigError
from dida.hub import EXPORT_CONFIG, EXPORT_META, EXPORT_WEIGHTS, HubError, file_sha256
from dida.io import atomic_path, claim_output, make_temp_dir

__all__ = ["EXPORT_FORMAT_VERSION", "MODEL_CARD", "export_folder", "method_name", "model_card", "upload_folder"]

EXPORT_FORMAT_VERSION = 1
MODEL_CARD = "README.md"
_EVAL_ROWS_SHOWN = 10

StateDict = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------ inputs


def _locate(source: Path, checkpoint: str | None) -> tuple[Path, Path | None]:
    """(checkpoint file, run directory or None) for ``dida export SOURCE [--checkpoint NAME]``."""
    if source.is_dir():
        ckpt = Path(checkpoint) if checkpoint and Path(checkpoint).is_file() else source / (checkpoint or "latest.pth")
        if not ckpt.is_file():
            raise CheckpointError(
                f"{ckpt}: no such checkpoint in the run directory {source}; name one with --checkpoint iter_N.pth."
            )
        return ckpt, source
    if not source.is_file():
        raise CheckpointError(f"{source}: no such run directory or checkpoint file.")
    return source, None


def _load_cfg(ckpt: Mapping[str, Any], run_dir: Path | None, config: str | None, source: Path) -> Any:
    """The resolved configuration: ``--config``, else the run's ``config.yaml``, else the checkpoint's own."""
    from dida.config import load_config

    if config:
        return load_config(config)
    if run_dir is not None and (run_dir / EXPORT_CONFIG).is_file():
        return load_config(str(run_dir))
    text = ckpt.get("config") if ckpt.get("format") == "dida" else None
    if isinstance(text, str) and text.strip():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / EXPORT_CONFIG
            path.write_text(text)
            return load_config(str(path))
    raise ConfigError(
        f"{source}: holds no configuration (and no config.yaml beside it): pass --config with the preset or "
        "YAML it was trained with."
    )


def _model_states(cfg: Any, ckpt: Mapping[str, Any], source: str) -> dict[str, StateDict]:
    """The student's and (when present) the EMA teacher's state dicts, each strictly loaded into the model."""
    from dida.checkpoint import load_checkpoint
    from dida.checkpoint.describe import describe_checkpoint
    from dida.models import build_model

    parts = describe_checkpoint(ckpt)["parts"]
    model_cfg = cfg.model
    model = build_model(model_cfg)
    states: dict[str, StateDict] = {}
    for which in EXPORT_WEIGHTS:
        if which in parts or (which == "model" and "weights" in parts):
            load_checkpoint(model, ckpt, which=which, source=source, segmentor_only=True)
            states[which] = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    if "model" not in states:
        raise CheckpointError(f"{source}: has no student (model) weights to export.")
    return states


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _eval_rows(run_dir: Path | None) -> list[dict[str, Any]]:
    """The complete rows of ``run_dir/eval.jsonl`` (evaluations during training)."""
    if run_dir is None or not (run_dir / "eval.jsonl").is_file():
        return []
    rows = []
    for line in (run_dir / "eval.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "iter" in row and "mIoU" in row:
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ model card


def method_name(cfg: Any) -> str:
    """The method a configuration trains: ``source-only``, ``DAFormer``, ``HRDA``, ``DIDA``, ``MIC(HRDA)`` ..."""
    uda, hrda = cfg.uda, cfg.model.segmentor == "hrda"
    if not uda.self_training:
        name = "source-only"
    elif uda.dual_level.enabled:
        name = "DIDA (HRDA)" if hrda else "DIDA"
    else:
        name = "HRDA" if hrda else "DAFormer"
    return f"MIC({name})" if uda.mic.enabled else name


_METRIC_KEYS = ("mIoU", "mIoU16", "mIoU13", "aAcc", "mAcc")


def _read_metrics(path: Path) -> dict[str, Any] | None:
    """A ``dida test`` ``metrics.json`` for the model card; None when unreadable. Raises ``ConfigError`` for a
    file that is JSON but not such a file (a list, no ``mIoU``, fractions outside [0, 1], NaN), which would
    otherwise print a wrong table (5730.00 for a percentage, nan) on the card."""
    data = _read_json(path)
    if data is None:
        return None
    fix = "give the metrics.json written by dida test (fractions in [0, 1]), or leave --metrics out"
    if not isinstance(data, dict) or "mIoU" not in data:
        raise ConfigError(f"{path}: not a dida test metrics.json (no 'mIoU' at the top level); {fix}.")
    values = [(k, data.get(k)) for k in _METRIC_KEYS if k in data]
    per_class = data.get("per_class") or {}
    if not isinstance(per_class, dict) or not isinstance(data.get("dataset") or {}, dict):
        raise ConfigError(f"{path}: 'per_class' and 'dataset' must be mappings; {fix}.")
    for name, entry in per_class.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: per_class.{name} must be a mapping of IoU / Acc; {fix}.")
        values += [(f"per_class.{name}.{k}", v) for k, v in entry.items()]
    for key, value in values:
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                                 and 0.0 <= value <= 1.0)
        if not ok:
            raise ConfigError(f"{path}: {key} is {value!r}, not a fraction in [0, 1]; {fix}.")
    return data


def _pct(x: Any) -> str:
    return "-" if not isinstance(x, (int, float)) else f"{100 * x:.2f}"


def _evaluation(test: Mapping[str, Any] | None, rows: list[dict[str, Any]], iteration: Any) -> list[str]:
    out = ["## Evaluation", ""]
    if test:
        keys = [k for k in ("mIoU", "mIoU16", "mIoU13", "aAcc", "mAcc") if k in test]
        data = test.get("dataset") or {}
        out += [(f"`dida test` ({test.get('which', 'model')}, {test.get('mode', 'whole')} inference) on "
                 f"{data.get('kind', '?')} {data.get('split', '?')} ({test.get('num_images', '?')} images):"), "",
                "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                "| " + " | ".join(_pct(test[k]) for k in keys) + " |", ""]
        per_class = test.get("per_class") or {}
        if per_class:
            out += ["| class | IoU | Acc |", "|---|---|---|"]
            out += [f"| {n} | {_pct(v.get('IoU'))} | {_pct(v.get('Acc'))} |" for n, v in per_class.items()]
            out.append("")
    if rows:
        out += ["Evaluation during training (`eval.jsonl`):", "", "| iteration | mIoU | aAcc |", "|---|---|---|"]
        shown = rows[-_EVAL_ROWS_SHOWN:]
        out += [f"| {r['iter']}{' (exported)' if r['iter'] == iteration else ''} | {_pct(r.get('mIoU'))} | "
                f"{_pct(r.get('aAcc'))} |" for r in shown]
        out.append("")
    if not test and not rows:
        out += ["No evaluation was recorded for this run: measure it with `dida test` (below).", ""]
    return out


def model_card(*, cfg: Any, meta: Mapping[str, Any], ref: str, test: Mapping[str, Any] | None,
               rows: list[dict[str, Any]]) -> str:
    """The ``README.md`` of an export: front matter, summary, evaluation, classes, files, use, reproduce."""
    from dida import __version__
    from dida.constants import class_names

    method = method_name(cfg)
    m, d = cfg.model, cfg.data
    title = f"{method} ({m.backbone}), {d.source.kind} -> {d.target.kind}"
    tag = method.lower().replace("(", "-").replace(")", "").replace(" ", "")
    lines = ["---", "library_name: dida", "pipeline_tag: image-segmentation", "tags:", "- semantic-segmentation",
             "- unsupervised-domain-adaptation", "- dida", f"- {tag}", "---", "", f"# {title}", "",
             (f"{method}: a `{m.segmentor}` segmentor on a `{m.backbone}` backbone, {m.num_classes} classes, "
              f"trained with dida {__version__} on labelled {d.source.kind} and unlabelled {d.target.kind} images "
              f"for {meta.get('iteration', '?')} iterations. Exported from `{meta.get('source')}` on "
              f"{meta.get('created')}."), ""]
    lines += _evaluation(test, rows, meta.get("iteration"))
    lines += ["## Classes", "", "| train id | class |", "|---|---|"]
    lines += [f"| {i} | {n} |" for i, n in enumerate(class_names(m.num_classes))]
    lines += ["", "## Files", "", "| file | holds | sha256 |", "|---|---|---|"]
    what = {"model": "the student (what the reference evaluates)", "ema_model": "the EMA teacher"}
    for name, info in meta["files"].items():
        lines.append(f"| `{name}` | {what[info['which']]}, {info['tensors']} tensors | `{info['sha256']}` |")
    lines += [f"| `{EXPORT_CONFIG}` | the resolved training configuration | |",
              f"| `{EXPORT_META}` | export metadata and the checksums above | |", "",
              "## Use", "", "```bash", "pip install dida",
              f"dida test {ref} data.val.root=data/cityscapes            # mIoU of the student",
              f"dida test {ref} --which ema_model data.val.root=data/cityscapes   # the EMA teacher",
              f"dida infer {ref} my_images/ --out predictions", "```", "", "```python",
              "from dida.checkpoint import load_checkpoint, model_cfg_from_checkpoint, read_checkpoint",
              "from dida.models import build_model", "",
              f'ckpt = read_checkpoint("{ref}")  # checks the sha256 of the weights', "model = build_model(model_cfg_from_checkpoint(ckpt))",
              'load_checkpoint(model, ckpt, which="model")', "```", "",
              "## Reproduce", "",
              f"`{EXPORT_CONFIG}` is the complete configuration of the run (the datasets are not included):", "",
              "```bash",
              (f"dida train {EXPORT_CONFIG} run.dir=work_dirs/{Path(str(meta.get('source'))).parent.name or 'run'} "
               "data.source.root=DATA/SOURCE data.target.root=DATA/TARGET data.val.root=DATA/VAL"),
              "```", ""]
    if m.pretrained:
        lines += [f"It starts from `model.pretrained={m.pretrained}`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- writing


def _write_weights(path: Path, state: StateDict, which: str, iteration: Any) -> dict[str, Any]:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:  # the mode open() gives (safetensors writes 0o600 files)
        save_file(state, str(tmp), metadata={"format": "pt", "dida_model": which, "iteration": str(iteration)})
    return {"which": which, "sha256": file_sha256(path), "bytes": path.stat().st_size, "tensors": len(state)}


def _check_round_trip(folder: Path, states: Mapping[str, StateDict]) -> None:
    """Read the written folder back through the checkpoint reader; every tensor must be identical."""
    from dida.checkpoint.io import read_export_folder

    back = read_export_folder(folder)
    for which, state in states.items():
        got = back.get(which) or {}
        bad = [k for k, v in state.items() if k not in got or got[k].dtype != v.dtype or not torch.equal(got[k], v)]
        if bad or set(got) != set(state):
            raise CheckpointError(f"{folder}: the written {which} weights do not read back identically ({bad[:3]}).")


def _move_into_place(staging: Path, dest: Path, force: bool) -> None:
    """Rename the complete ``staging`` folder onto ``dest``; an existing ``dest`` goes only with ``force``."""
    if not dest.exists():
        os.replace(staging, dest)
        return
    if not force:
        raise CheckpointError(f"{dest}: already exists; pass --force to replace it, or choose another --to.")
    backup = dest.with_name(f".{dest.name}.replaced-{os.getpid()}")
    os.replace(dest, backup)
    try:
        os.replace(staging, dest)
    except BaseException:
        os.replace(backup, dest)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def export_folder(source: str | os.PathLike[str], dest: str | os.PathLike[str], *, checkpoint: str | None = None,
                  config: str | None = None, metrics: str | os.PathLike[str] | None = None,
                  repo_id: str | None = None, force: bool = False, allow_pickle: bool = False) -> dict[str, Any]:
    """Write the export folder of a run (or of one checkpoint) to ``dest``, atomically.

    Args:
        source: a run directory (``latest.pth`` and ``config.yaml``) or a checkpoint file (dida, mmcv, segmentor).
        dest: the folder to create.
        checkpoint: the checkpoint of the run directory to export (default ``latest.pth``).
        config: a preset or YAML, for a checkpoint that holds no configuration (e.g. a released mmcv file).
        metrics: a ``dida test`` ``metrics.json`` for the model card (default ``<run>/test/metrics.json``).
        repo_id: the Hub repository the folder is meant for (the model card's commands name it).
        force: replace an existing ``dest``.
        allow_pickle: trust the checkpoint (unsafe unpickling).

    Returns:
        The ``dida_export.json`` contents.

    Raises:
        CheckpointError: ``dest`` exists without ``force``; no checkpoint; weights that do not fit the config.
        ConfigError: no configuration to be found.
    """
    from dida import __version__
    from dida.checkpoint import read_checkpoint
    from dida.config import to_yaml

    source, dest = Path(source), Path(dest)
    if dest.exists() and not dest.is_dir():
        raise CheckpointError(f"{dest}: is a file; --to needs a folder path (it is created).")
    if dest.exists() and not force:
        raise CheckpointError(f"{dest}: already exists; pass --force to replace it, or choose another --to.")
    claim_output(dest, kind="dir", files=(), option="--to")  # checks that its folder is writable
    ckpt_path, run_dir = _locate(source, checkpoint)
    ckpt = read_checkpoint(ckpt_path, allow_pickle=allow_pickle)
    cfg = _load_cfg(ckpt, run_dir, config, ckpt_path)
    states = _model_states(cfg, ckpt, str(ckpt_path))
    iteration = ckpt.get("iteration") if ckpt.get("format") == "dida" else (ckpt.get("meta") or {}).get("iter")
    metrics_path = Path(metrics) if metrics else (run_dir / "test" / "metrics.json" if run_dir else None)
    test = _read_metrics(metrics_path) if metrics_path is not None and metrics_path.is_file() else None
    if metrics and test is None:
        raise ConfigError(f"{metrics}: not a readable metrics.json (written by dida test).")

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = make_temp_dir(dest.parent, prefix=f".{dest.name}.")
    try:
        meta: dict[str, Any] = {
            "format": "dida-export", "version": EXPORT_FORMAT_VERSION, "dida_version": __version__,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "source": str(ckpt_path), "iteration": iteration,
            "method": method_name(cfg), "files": {}, "metrics": test,
        }
        for which, state in states.items():
            name = EXPORT_WEIGHTS[which]
            meta["files"][name] = _write_weights(staging / name, state, which, iteration)
        (staging / EXPORT_CONFIG).write_text(to_yaml(cfg))
        (staging / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
        ref = f"hf://{repo_id}" if repo_id else str(dest)
        (staging / MODEL_CARD).write_text(model_card(cfg=cfg, meta=meta, ref=ref, test=test, rows=_eval_rows(run_dir)))
        _check_round_trip(staging, states)
        _move_into_place(staging, dest, force)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):  # name the folder asked for, not the staging one
            e.filename, e.filename2 = str(dest), None
        raise
    return meta


# ---------------------------------------------------------------------------------------- uploading


def upload_folder(folder: str | os.PathLike[str], repo_id: str, *, private: bool = False, force: bool = False,
                  message: str | None = None, keep_hint: str = "") -> str:
    """Create ``repo_id`` on the Hub (if needed) and upload ``folder`` as one commit; returns its address.

    An existing repository is written to only with ``force`` (the Hub keeps its previous commits).

    Raises:
        HubError: the repository exists without ``force``; not logged in; the Hub unreachable or refusing.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        if not force and api.repo_exists(repo_id):
            raise HubError(
                f"{repo_id}: already exists on the Hub; pass --force to upload the export as a new commit "
                "(the Hub keeps the previous ones in its history)."
            )
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                 commit_message=message or f"dida export ({Path(folder).name})")
    except HubError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise HubError(
            f"{repo_id}: the upload failed ({type(e).__name__}: {first}). Log in with a write token "
            f"(hf auth login, or set HF_TOKEN) and check the network, then run again{keep_hint}."
        ) from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")

"""One module per subcommand, and every list of dataset kinds read from ``DATASET_KINDS``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from types import SimpleNamespace

import pytest

from dida.cli import build_parser
from dida.data.kinds import DATASET_KINDS, convertible_kinds
from dida.errors import ConfigError, DataError


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _entries(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, str]:
    found = {}
    for name, sub in _subparsers(parser).items():
        if sub.get_default("_entry"):
            found[prefix + name] = sub.get_default("_entry")
        found.update(_entries(sub, prefix + name + " "))
    return found


def test_every_subcommand_is_main_of_its_own_commands_module():
    entries = _entries(build_parser())
    assert set(entries) == {"train", "test", "infer", "convert", "bank build", "synth", "convert-checkpoint",
                            "demo", "weights", "export"}
    modules = [entry.split(":")[0] for entry in entries.values()]
    assert len(set(modules)) == len(modules)
    for entry in entries.values():
        module_name, func_name = entry.split(":")
        assert module_name.startswith("dida.commands.") and func_name == "main", entry
        assert callable(getattr(importlib.import_module(module_name), func_name))


_CONVERT_CALLS: list[tuple] = []


def _fake_convert(kind, root, nproc=4, force=False):
    _CONVERT_CALLS.append((kind, root, nproc, force))
    return {"files": 2, "converted": 1, "skipped": 1}


@pytest.fixture
def extra_kind(monkeypatch):
    """A 4-class dataset kind with its own converter and source scale, added to the table."""
    _CONVERT_CALLS.clear()
    kind = dataclasses.replace(DATASET_KINDS["gta"], num_classes=4, converter=f"{__name__}:_fake_convert",
                               source_scale=(96, 48))
    monkeypatch.setitem(DATASET_KINDS, "toy", kind)
    return _CONVERT_CALLS


def test_cli_choices_follow_the_kinds_table(extra_kind):
    parser = build_parser()
    assert "toy" in convertible_kinds()
    assert parser.parse_args(["convert", "toy", "root"]).dataset == "toy"
    args = parser.parse_args(["bank", "build", "c.pth", "--data", "d", "--out", "o", "--dataset", "toy"])
    assert args.dataset == "toy"
    with pytest.raises(SystemExit):
        parser.parse_args(["bank", "build", "c.pth", "--data", "d", "--out", "o", "--dataset", "folder"])


def test_convert_runs_the_converter_the_table_names(extra_kind, capsys):
    from dida.commands.convert import converter, main

    assert main(argparse.Namespace(dataset="toy", root="r", nproc=3, force=True)) == 0
    assert extra_kind == [("toy", "r", 3, True)]
    assert "toy: 2 label files, 1 converted, 1 already done" in capsys.readouterr().out
    with pytest.raises(DataError, match="unknown dataset kind 'folder'"):
        converter("folder")


def test_class_count_check_reads_the_table(extra_kind):
    from dida.commands.test import _check_class_count

    _check_class_count("c.pth", {}, 4, "toy")
    _check_class_count("c.pth", {}, 7, "folder")
    with pytest.raises(ConfigError, match="has 4 train ids. Use a 4-class checkpoint"):
        _check_class_count("c.pth", {}, 19, "toy")


def test_bank_build_default_scale_is_the_kinds_source_scale(extra_kind, monkeypatch, tmp_path, capsys):
    import torch

    from dida.commands import bank
    from dida.uda.instance_bank import InstanceBank

    seen = {}

    def fake_build_bank(model, dataset, size, num_classes, **kwargs):
        seen.update(kwargs, dataset=dataset)
        return InstanceBank(torch.ones(size, 2), torch.zeros(size, dtype=torch.int64), num_classes)

    # a checkpoint without a stored configuration: the dataset kind's reference scale applies
    resolved = SimpleNamespace(assumed=["test scale"], source="the weights",
                               cfg=SimpleNamespace(data=SimpleNamespace(source=SimpleNamespace(
                                   kind="gta", root="data/gta", img_scale=[1280, 720]))))
    monkeypatch.setattr(bank, "_load_model", lambda args: (SimpleNamespace(num_classes=4), resolved))
    monkeypatch.setattr(bank, "_build_dataset", lambda kind, root, n: (kind, root, n))
    monkeypatch.setattr(bank, "build_bank", fake_build_bank)
    args = build_parser().parse_args(["bank", "build", "c.pth", "--data", "d", "--out", str(tmp_path),
                                      "--dataset", "toy", "--size", "3", "--device", "cpu"])
    assert bank.main(args) == 0
    assert seen["img_scale"] == (96, 48) and seen["dataset"] == ("toy", "d", 4)
    assert seen["device"] == torch.device("cpu")
    assert "class_0" in capsys.readouterr().out  # dida.constants.class_names for C != 19

"""The README's Python section runs as written, after `dida demo` (here its quick version) made the files it
names; and every `dida` command the README's tour names exists."""

from __future__ import annotations

import re
import runpy
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_the_python_section_runs_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")  # the demo's report
    from dida.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--out", "work_dirs/demo"]) == 0
    code = re.findall(r"```python\n(.*?)```", _section("Python"), flags=re.DOTALL)
    assert len(code) == 1
    script = tmp_path / "readme_python.py"
    script.write_text(code[0])
    capsys.readouterr()
    namespace = runpy.run_path(str(script))
    labels, overlay = namespace["labels"], namespace["overlay"]
    assert labels.ndim == 2 and overlay.shape == (*labels.shape, 3)
    out = capsys.readouterr().out
    assert "settings from the checkpoint's configuration" in out


def test_the_tour_names_only_existing_commands_and_options():
    from dida.cli import build_parser

    parser = build_parser()
    tour = re.findall(r"```bash\n(.*?)```", _section("A short tour"), flags=re.DOTALL)[0]
    for line in tour.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("dida "):
            continue
        words = shlex.split(line)[1:]
        # the arguments must parse (files need not exist): unknown options or subcommands exit with 2
        args = parser.parse_args(words)
        assert args._entry.startswith("dida.commands."), line

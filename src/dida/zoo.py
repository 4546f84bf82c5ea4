"""The model zoo: the known weights (``zoo.yaml``, package data), for ``dida weights`` and for hints.

Each entry names the file (on the Hugging Face Hub as an ``hf://`` reference, or outside it with the
release's own link and file name), its sha256 when one is published ("unknown" otherwise), what it is
reported to score, the preset that evaluates it, and what a correct file holds (``expect``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from dida.errors import ConfigError

__all__ = ["UNKNOWN", "ZooEntry", "find_entry", "load_zoo", "missing_file_hint", "parse_zoo"]

UNKNOWN = "unknown"
_KINDS = ("backbone", "uda")
_EXPECT_KEYS = ("format", "segmentor", "backbone", "num_classes")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ZooEntry:
    """One known set of weights (see ``zoo.yaml`` for the meaning of each field)."""

    name: str
    kind: str
    title: str
    file: str
    url: str
    sha256: str
    source: str
    hub: str | None = None
    method: str | None = None
    benchmark: str | None = None
    checkpoint: str | None = None
    preset: str | None = None
    reported: dict[str, float] = field(default_factory=dict)
    released: dict[str, float] = field(default_factory=dict)
    expect: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256_known(self) -> bool:
        return self.sha256 != UNKNOWN

    def scores(self) -> str:
        """``mIoU 68.3 (released 68.85)``, or ``-`` for backbones."""
        if not self.reported:
            return "-"
        text = ", ".join(f"{k} {v}" for k, v in self.reported.items())
        if self.released:
            text += " (released " + ", ".join(f"{v}" for v in self.released.values()) + ")"
        return text


def parse_zoo(data: Any, source: str = "zoo.yaml") -> dict[str, ZooEntry]:
    """Entries from the parsed YAML mapping, every field checked.

    Raises:
        ConfigError: naming the entry and the field that is missing, unknown or malformed.
    """
    from dida.hub import is_hub_ref, parse_ref

    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must map names to entries.")
    names = {f for f in ZooEntry.__dataclass_fields__ if f != "name"}
    out: dict[str, ZooEntry] = {}
    for name, raw in data.items():
        where = f"{source}: entry '{name}'"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: must be a mapping of fields.")
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown fields {unknown}; known: {sorted(names)}.")
        try:
            entry = ZooEntry(name=str(name), **raw)
        except TypeError as e:
            raise ConfigError(f"{where}: {e}.") from None
        if entry.kind not in _KINDS:
            raise ConfigError(f"{where}: kind must be one of {_KINDS}, got {entry.kind!r}.")
        if entry.sha256 != UNKNOWN and not _SHA256.match(entry.sha256):
            raise ConfigError(f"{where}: sha256 must be 64 lower-case hex digits or '{UNKNOWN}'.")
        if entry.hub is not None:
            if not is_hub_ref(entry.hub):
                raise ConfigError(f"{where}: hub must be an hf:// reference or null.")
            parse_ref(entry.hub)
        if set(entry.expect) - set(_EXPECT_KEYS):
            raise ConfigError(f"{where}: expect may only name {_EXPECT_KEYS}.")
        if entry.kind == "uda" and not entry.reported:
            raise ConfigError(f"{where}: a uda entry needs its reported numbers.")
        out[entry.name] = entry
    return out


@lru_cache(maxsize=1)
def load_zoo() -> dict[str, ZooEntry]:
    """The shipped zoo (``dida/zoo.yaml``)."""
    import yaml

    text = resources.files("dida").joinpath("zoo.yaml").read_text()
    return parse_zoo(yaml.safe_load(text))


def find_entry(name: str, zoo: dict[str, ZooEntry] | None = None) -> ZooEntry:
    """The entry called ``name``.

    Raises:
        ConfigError: no such entry (lists the known names).
    """
    zoo = load_zoo() if zoo is None else zoo
    if name not in zoo:
        raise ConfigError(f"'{name}' is not in the model zoo; known: {', '.join(zoo)} (see dida weights list).")
    return zoo[name]


def missing_file_hint(path: str | os.PathLike[str]) -> str:
    """For a missing file named like a zoo file (``pretrained/mit_b5.pth``): where to get it (one sentence)."""
    try:
        zoo = load_zoo()
    except ConfigError:  # a hint must never hide the real error
        return ""
    name = Path(path).name
    for entry in zoo.values():
        if entry.file != name:
            continue
        if entry.hub:
            return (f" It is the {entry.title}: use {entry.hub} instead (e.g. model.pretrained={entry.hub}), "
                    f"or see dida weights get {entry.name}.")
        return f" It is the {entry.title}: dida weights get {entry.name} says where to download it."
    return ""

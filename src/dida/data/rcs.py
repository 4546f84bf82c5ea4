"""Rare Class Sampling (DAFormer, spec 3): pick a class by rarity, then a source file containing it.

From the statistics written by ``dida convert``:

1. n_c = total pixels of class c over all files; only classes that occur are kept, sorted by n_c
   ascending (ties keep first-seen order).
2. f_c = n_c / sum(n); P(c) = softmax((1 - f_c) / T), computed in float32 torch like the reference.
3. Candidates of class c = basenames of the files whose count of c is > ``min_pixels`` (strict).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from dida.errors import DataError

STATS_FILE = "sample_class_stats.json"
SAMPLES_WITH_CLASS_FILE = "samples_with_class.json"


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise DataError(f"{path}: rare-class statistics not found. Run `dida convert "
                        f"<gta|synthia|cityscapes> {path.parent}` to create them, or set "
                        "data.rcs.enabled=false.")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the statistics ({e}). Re-run `dida convert`.") from None


def class_probabilities(sample_class_stats: list[dict], temperature: float) -> tuple[list[int], np.ndarray]:
    """Classes sorted by total pixel count (ascending) and their RCS probabilities (float32).

    Args:
        sample_class_stats: the list from ``sample_class_stats.json`` (string class keys, "file").
        temperature: T in softmax((1 - f_c) / T).
    """
    totals: dict[int, int] = {}
    for stats in sample_class_stats:
        for key, count in stats.items():
            if key == "file":
                continue
            totals[int(key)] = totals.get(int(key), 0) + int(count)
    ordered = sorted(totals.items(), key=lambda item: item[1])  # stable: ties keep first-seen order
    classes = [c for c, _ in ordered]
    freq = torch.tensor([n for _, n in ordered])
    freq = freq / torch.sum(freq)  # int64 / int64 -> float32 (torch default dtype), as in the reference
    freq = torch.softmax((1 - freq.float()) / temperature, dim=-1)
    return classes, freq.numpy()


class RareClassSampler:
    """Draws (class, source basename) pairs with DAFormer's rare-class sampling.

    Attributes:
        classes: class ids in probability order (ascending total pixel count).
        probs: float32 array of P(c), aligned with ``classes``.
        probabilities: dict class -> probability (same order).
        files: dict class -> basenames of the candidate files.
        min_pixels: the candidate threshold; the crop check uses ``min_pixels * min_crop_ratio``.
    """

    def __init__(self, sample_class_stats: list[dict], samples_with_class: dict[str, list],
                 temperature: float = 0.01, min_pixels: int = 3000, source: str = "statistics") -> None:
        if temperature <= 0:
            raise DataError(f"rare-class temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)
        self.min_pixels = int(min_pixels)
        self.classes, self.probs = class_probabilities(sample_class_stats, temperature)
        if not self.classes:
            raise DataError(f"{source}: the statistics hold no labelled pixel; re-run `dida convert` or "
                            "set data.rcs.enabled=false.")
        self.probabilities = {c: float(p) for c, p in zip(self.classes, self.probs)}
        self.files: dict[int, list[str]] = {}
        for c in self.classes:
            entries = samples_with_class.get(str(c), [])
            names = [str(file).split("/")[-1] for file, pixels in entries if pixels > self.min_pixels]
            if not names:
                raise DataError(
                    f"{source}: no file holds more than {self.min_pixels} pixels of class {c}, so rare-class "
                    "sampling cannot draw it. Lower data.rcs.min_pixels or set data.rcs.enabled=false."
                )
            self.files[c] = names

    @classmethod
    def from_stats(cls, path: str | os.PathLike[str], temperature: float = 0.01, min_pixels: int = 3000
                   ) -> RareClassSampler:
        """Read ``sample_class_stats.json`` and ``samples_with_class.json`` from a dataset root.

        Args:
            path: the folder holding the statistics, or the ``sample_class_stats.json`` file itself.
        """
        path = Path(path)
        folder = path.parent if path.suffix == ".json" else path
        stats_path = path if path.suffix == ".json" else folder / STATS_FILE
        stats = _read_json(stats_path)
        with_class = _read_json(folder / SAMPLES_WITH_CLASS_FILE)
        if not isinstance(stats, list) or not isinstance(with_class, dict):
            raise DataError(f"{folder}: unexpected statistics layout (want a list in {STATS_FILE} and a "
                            f"dict in {SAMPLES_WITH_CLASS_FILE}). Re-run `dida convert`.")
        return cls(stats, with_class, temperature, min_pixels, source=str(folder))

    def __repr__(self) -> str:
        top = ", ".join(f"{c}: {p:.3f}" for c, p in list(self.probabilities.items())[:5])
        return f"RareClassSampler(T={self.temperature}, min_pixels={self.min_pixels}, {{{top}, ...}})"

    def sample(self, rng: np.random.Generator) -> tuple[int, str]:
        """Draw c ~ P, then one of its candidate files uniformly. Returns (class, basename)."""
        c = self.classes[int(rng.choice(len(self.classes), p=self.probs))]
        names = self.files[c]
        return c, names[int(rng.integers(len(names)))]

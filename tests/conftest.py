"""Shared fixtures: a tiny model configuration, a seeded generator and the generated fake datasets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch

from dida.data.fake import write_fake_cityscapes, write_fake_gta, write_fake_synthia

# Tiny models are dominated by threading overhead; one thread is much faster on a small shared CPU.
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the CLI subprocesses the tests start
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE = SHARED / "reference"


@pytest.fixture
def tiny_model_kwargs() -> dict:
    """MiT with dims (8, 16, 32, 64), one block and one head per stage, head channels 16, 4 classes."""
    return {
        "backbone": "mit_b0",
        "num_classes": 4,
        "embed_dims": [8, 16, 32, 64],
        "num_heads": [1, 1, 1, 1],
        "depths": [1, 1, 1, 1],
        "decoder_channels": 16,
    }


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on tiny tensors thread start-up dominates and oversubscribes shared CI
    cores. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@dataclass(frozen=True)
class FakeDataset:
    """One generated dataset: ``n`` images (per split for Cityscapes) of ``size`` = (width, height)."""

    kind: Literal["gta", "synthia", "cityscapes"]
    n: int
    size: tuple[int, int]
    seed: int


# Every fake dataset of the suite, by its folder under the ``fake_data`` root. Users that need other
# sizes get another profile folder here (same generator), never their own copy of the writer calls.
FAKE_DATASETS: dict[str, FakeDataset] = {
    # "tiny_cpu": the GTA -> Cityscapes pair of the tiny_cpu training runs (tests/engine, tests/reliability);
    # 16:9 GTA-like and 2:1 Cityscapes-like images, larger than the preset's 64x64 crops after resizing.
    "tiny_cpu/gta": FakeDataset("gta", n=6, size=(192, 108), seed=0),
    "tiny_cpu/cs": FakeDataset("cityscapes", n=3, size=(256, 128), seed=1),
    # "formats": one dataset of each kind, whose sizes and counts tests/data asserts.
    "formats/gta": FakeDataset("gta", n=6, size=(96, 64), seed=1),
    "formats/synthia": FakeDataset("synthia", n=4, size=(96, 57), seed=2),
    "formats/cityscapes": FakeDataset("cityscapes", n=3, size=(128, 64), seed=3),
}


def write_fake_data(root: Path, datasets: dict[str, FakeDataset] = FAKE_DATASETS) -> Path:
    """Write (and convert) every dataset of ``datasets`` under ``root``; returns ``root``."""
    for folder, d in datasets.items():
        if d.kind == "gta":
            write_fake_gta(root / folder, n=d.n, size=d.size, seed=d.seed)
        elif d.kind == "synthia":
            write_fake_synthia(root / folder, n=d.n, size=d.size, seed=d.seed)
        else:
            write_fake_cityscapes(root / folder, splits=("train", "val"), n_per_split=d.n, size=d.size,
                                  seed=d.seed)
    return root


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory) -> Iterator[Path]:
    """The root of every generated dataset (``FAKE_DATASETS``), written once per session. Read-only:
    a test that damages data works on a copy. The teardown fails if a test changed a file here."""
    root = write_fake_data(tmp_path_factory.mktemp("fake_data"))
    before = _tree_state(root)
    yield root
    after = _tree_state(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"tests modified the shared fake datasets (copy them first): {changed[:10]}"


@pytest.fixture
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip("../shared/reference is absent")
    return REFERENCE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

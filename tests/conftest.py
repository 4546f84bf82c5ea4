"""Shared fixtures: a tiny model configuration and a seeded generator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny models are dominated by threading overhead; one thread is much faster on a small shared CPU.
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the CLI subprocesses the tests start
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE = SHARED / "reference"


@pytest.fixture
def tiny_model_kwargs() -> dict:
    """MiT with dims (8, 16, 32, 64), one block and one head per stage, head channels 16, 4 classes."""
    return dict(
        backbone="mit_b0",
        num_classes=4,
        embed_dims=[8, 16, 32, 64],
        num_heads=[1, 1, 1, 1],
        depths=[1, 1, 1, 1],
        decoder_channels=16,
    )


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


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

"""Fixtures of tests/data: tiny converted GTA / SYNTHIA / Cityscapes datasets (session-scoped, read-only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fake_datasets import write_fake_cityscapes, write_fake_gta, write_fake_synthia


@pytest.fixture(scope="session")
def gta_root(tmp_path_factory) -> Path:
    return write_fake_gta(tmp_path_factory.mktemp("data") / "gta", n=6, size=(96, 64), seed=1)


@pytest.fixture(scope="session")
def synthia_root(tmp_path_factory) -> Path:
    return write_fake_synthia(tmp_path_factory.mktemp("data") / "synthia", n=4, size=(96, 57), seed=2)


@pytest.fixture(scope="session")
def cityscapes_root(tmp_path_factory) -> Path:
    return write_fake_cityscapes(tmp_path_factory.mktemp("data") / "cityscapes", n_per_split=3,
                                 size=(128, 64), seed=3)

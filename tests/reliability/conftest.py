"""Shared fixtures of the reliability tests: the tiny generated GTA -> Cityscapes pair of ``fake_data``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def rel_data(fake_data) -> Path:
    """``gta/`` and ``cs/``. Read-only: tests that damage data copy it first (see ``rel_data_copy``)."""
    return fake_data / "tiny_cpu"


@pytest.fixture
def rel_data_copy(rel_data, tmp_path) -> Path:
    """A private copy of the tiny datasets that a test may corrupt or delete."""
    import shutil

    dst = tmp_path / "data"
    shutil.copytree(rel_data, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, rel_data) -> Path:
    """A run directory (``config.yaml`` + ``latest.pth``, student only) of a tiny 19-class MiT on ``rel_data``,
    built without training. Read-only: tests that damage it copy it first."""
    from rel_helpers import data_overrides

    from dida.checkpoint import save_checkpoint
    from dida.config import load_config, to_yaml
    from dida.models import build_model

    run = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config("tiny_cpu", [f"run.dir={run}", *data_overrides(rel_data), *TINY_MODEL])
    model = build_model(cfg.model, generator=torch.Generator().manual_seed(0))
    save_checkpoint(run / "latest.pth", {"model": model.state_dict(), "ema_model": None, "iteration": 2,
                                         "config": to_yaml(cfg), "meta": {}})
    (run / "config.yaml").write_text(to_yaml(cfg))
    return run


# The tiny MiT of tests/conftest.py (tiny_model_kwargs) as overrides, with 19 classes.
TINY_MODEL = ("model.embed_dims=[8,16,32,64]", "model.num_heads=[1,1,1,1]", "model.depths=[1,1,1,1]",
              "model.decoder_channels=16")

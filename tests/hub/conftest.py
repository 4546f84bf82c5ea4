"""Every test here runs offline against its own Hugging Face cache folder (never the user's, never the network)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_helpers import FakeHub

pytest.importorskip("huggingface_hub")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache, in offline mode (``HF_HUB_OFFLINE=1``) unless a test turns it off."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return cache


def point_client_at(monkeypatch, endpoint: str) -> None:
    """Send the client's Hub requests to ``endpoint`` (what HF_ENDPOINT does when set before the import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def fake_hub(hf_cache, monkeypatch) -> Iterator[FakeHub]:
    """Online mode against a Hub endpoint on 127.0.0.1 (see ``hub_helpers.FakeHub``)."""
    with FakeHub() as hub:
        point_client_at(monkeypatch, hub.url)
        yield hub

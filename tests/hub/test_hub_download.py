"""Downloads through ``huggingface_hub``'s HTTP client, against a Hub endpoint on 127.0.0.1 (``FakeHub``).

Missing repositories, revisions and files get the Hub's own error codes; "no network" is a closed local
port. Each failure must be one line naming the reference and the fix.
"""

from __future__ import annotations

import socket

import pytest
import torch
from conftest import point_client_at
from hub_helpers import (
    TINY_MIT,
    etag_of,
    hf_segformer_state,
    safetensors_bytes,
    tiny_mit_state,
    torch_bytes,
)

from dida.checkpoint import load_checkpoint
from dida.cli import main
from dida.config import ModelCfg
from dida.hub import HubError, resolve
from dida.models import build_model

REPO = "acme/mit-tiny"


def _one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def _weights(seed: int) -> bytes:
    return safetensors_bytes(hf_segformer_state(tiny_mit_state(seed)))


def test_download_then_offline_from_the_cache(fake_hub, monkeypatch):
    from huggingface_hub import constants

    data = _weights(1)
    fake_hub.add(REPO, {"model.safetensors": data, "config.json": b"{}"})
    path = resolve(f"hf://{REPO}")
    assert path.name == "model.safetensors" and path.read_bytes() == data
    assert path.resolve().name == etag_of("model.safetensors", data)  # the library's blob, named by its sha256
    assert ("GET", f"/{REPO}/resolve/main/model.safetensors") in fake_hub.requests
    # Offline now: the cached copy, without a single request.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(fake_hub.requests)
    assert resolve(f"hf://{REPO}") == path
    assert len(fake_hub.requests) == n


def test_falls_back_to_pytorch_model_bin_and_loads(fake_hub):
    mit = tiny_mit_state(2)
    fake_hub.add(REPO, {"pytorch_model.bin": torch_bytes(hf_segformer_state(mit))})
    model = build_model(ModelCfg(num_classes=4, **TINY_MIT))
    info = load_checkpoint(model.backbone, f"hf://{REPO}")
    assert info["source"] == f"hf://{REPO}" and info["format"] == "hf"
    assert resolve(f"hf://{REPO}").name == "pytorch_model.bin"
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, mit[k]), k


def test_revisions_online(fake_hub):
    old, new = _weights(3), _weights(4)
    c_old = fake_hub.add(REPO, {"model.safetensors": old}, refs=("v1.0",))
    fake_hub.add(REPO, {"model.safetensors": new}, refs=("main",))
    assert resolve(f"hf://{REPO}@v1.0").read_bytes() == old
    assert resolve(f"hf://{REPO}/model.safetensors@{c_old}").read_bytes() == old
    assert resolve(f"hf://{REPO}").read_bytes() == new


def test_resumes_an_interrupted_download(fake_hub, hf_cache):
    data = _weights(5)
    fake_hub.add(REPO, {"model.safetensors": data})
    blobs = hf_cache / f"models--{REPO.replace('/', '--')}" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{etag_of('model.safetensors', data)}.incomplete").write_bytes(data[:1000])
    assert resolve(f"hf://{REPO}/model.safetensors").read_bytes() == data


@pytest.mark.parametrize(("ref", "says"), [
    ("hf://acme/no-such-repo", "no such repository on the Hub (acme/no-such-repo), or it is private"),
    (f"hf://{REPO}/other.pth", "the repository has no file 'other.pth' at main; check the path against"),
    (f"hf://{REPO}@v9", "the repository has no revision 'v9' (a branch, tag or commit)"),
    ("hf://acme/no-weights", ("has neither model.safetensors nor pytorch_model.bin; name the file: "
                              "hf://acme/no-weights/FILE")),
])
def test_missing_repo_revision_file_weights(fake_hub, ref, says):
    fake_hub.add(REPO, {"model.safetensors": _weights(6)})
    fake_hub.add("acme/no-weights", {"README.md": b"# nothing\n"})
    with pytest.raises(HubError) as info:
        resolve(ref)
    msg = _one_line(info)
    assert msg.startswith(ref) and says in msg


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_network(hf_cache, monkeypatch):
    """The Hub unreachable: a cached copy is used; without one, one line on what to do."""
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # the client's retry back-off, not the network
    point_client_at(monkeypatch, f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(HubError) as info:
        resolve(f"hf://{REPO}/model.safetensors")
    msg = _one_line(info)
    assert "cannot reach the Hugging Face Hub (http://127.0.0.1:" in msg
    assert "Check the connection or proxy (HF_ENDPOINT for a mirror)" in msg
    assert f"/{REPO}/resolve/main/model.safetensors by hand and pass its local path" in msg
    with pytest.raises(HubError, match="cannot reach the Hugging Face Hub"):
        resolve(f"hf://{REPO}")


def test_no_network_uses_the_cache(hf_cache, monkeypatch):
    from hub_helpers import add_to_cache, commit_id

    data = _weights(7)
    add_to_cache(hf_cache, REPO, {"model.safetensors": data}, commit_id("x"))
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    point_client_at(monkeypatch, f"http://127.0.0.1:{_closed_port()}")
    assert resolve(f"hf://{REPO}").read_bytes() == data


def test_weights_get_and_verify_a_hub_file(fake_hub, monkeypatch, capsys):
    from huggingface_hub import constants

    fake_hub.add(REPO, {"pytorch_model.bin": torch_bytes(hf_segformer_state(tiny_mit_state(8)))})
    assert main(["weights", "get", f"hf://{REPO}"]) == 0
    out = capsys.readouterr().out
    assert f"hf://{REPO} -> " in out and "pytorch_model.bin" in out and "sha256: " in out
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["weights", "verify", f"hf://{REPO}"]) == 0
    out = capsys.readouterr().out
    assert "format:  hf" in out and "OK: " in out
    assert "model:   a mit_b5 (embed_dims [8, 16, 32, 64], depths [1, 1, 1, 1]) backbone's weights" in out

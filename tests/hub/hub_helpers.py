"""Offline stand-ins for the Hugging Face Hub, used through the real ``huggingface_hub`` client.

- ``add_to_cache`` writes a repository into a Hub cache folder exactly as ``huggingface_hub`` lays it out
  (``models--ORG--REPO/{blobs,snapshots/<commit>,refs/<branch>}``, blobs named by their sha256 when stored
  with LFS, by their git blob sha1 otherwise, snapshot entries as relative symlinks).
- ``FakeHub`` is a Hub-compatible ``resolve`` endpoint on 127.0.0.1 serving in-memory repositories (HEAD and
  GET with the Hub's headers and error codes, ranged GETs for resumed downloads), so that downloads, missing
  repositories / revisions / files and revision pinning go through the library's real HTTP code.
- tiny MiT weights in the Hugging Face SegFormer layout (``segformer.encoder.*`` + an ImageNet classifier).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import torch

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
TINY_MIT = {"backbone": "mit_b0", "embed_dims": [8, 16, 32, 64], "num_heads": [1, 1, 1, 1],
            "depths": [1, 1, 1, 1], "decoder_channels": 16}


def etag_of(name: str, data: bytes) -> str:
    """The Hub's ETag of a file: the sha256 of LFS files, the git blob sha1 of the others."""
    if name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def commit_id(seed: str) -> str:
    return hashlib.sha1(seed.encode()).hexdigest()


def add_to_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str,
                 refs: tuple[str, ...] = ("main",)) -> Path:
    """Write ``files`` as ``commit`` of ``repo_id`` into the Hub cache ``cache``; ``refs`` point at it."""
    root = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = root / "blobs" / etag_of(name, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        path = root / "refs" / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(commit)
    return root / "snapshots" / commit


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def tiny_mit_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The backbone state dict (MiT names) of the tiny MiT, drawn from ``seed``."""
    from dida.config import ModelCfg
    from dida.models import build_model

    torch.manual_seed(seed)
    model = build_model(ModelCfg(num_classes=4, **TINY_MIT), generator=torch.Generator().manual_seed(seed))
    return {k: v.clone() for k, v in model.backbone.state_dict().items()}


def hf_segformer_state(mit: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``mit`` in the Hub's ``SegformerForImageClassification`` layout (as in ``nvidia/mit-b*``)."""
    from dida.models.mit_weights import mit_to_hf_state_dict

    sd = mit_to_hf_state_dict(mit, layout="hub", prefix="segformer.")
    sd["classifier.weight"] = torch.randn(10, 64)
    sd["classifier.bias"] = torch.zeros(10)
    return sd


def safetensors_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in sd.items()})


def torch_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


class FakeHub:
    """A Hub ``resolve`` endpoint on 127.0.0.1: ``add(repo_id, files, ...)`` then point the client at ``url``."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def add(self, repo_id: str, files: dict[str, bytes], *, commit: str | None = None,
            refs: tuple[str, ...] = ("main",)) -> str:
        commit = commit or commit_id(f"{repo_id}:{len(self.repos.get(repo_id, {}).get('commits', {}))}")
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        repo["commits"][commit] = dict(files)
        for ref in refs:
            repo["refs"][ref] = commit
        return commit

    def __enter__(self):  # -> FakeHub
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _error(self, h: BaseHTTPRequestHandler, code: str, commit: str | None = None) -> None:
        h.send_response(404)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", code)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((h.command, h.path))
        parts = h.path.split("?")[0].lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(h, "RepoNotFound")
        repo_id, revision, name = "/".join(parts[:2]), unquote(parts[3]), unquote("/".join(parts[4:]))
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, "RepoNotFound")
        commit = repo["refs"].get(revision, revision if revision in repo["commits"] else None)
        if commit is None:
            return self._error(h, "RevisionNotFound")
        data = repo["commits"][commit].get(name)
        if data is None:
            return self._error(h, "EntryNotFound", commit)
        start = 0
        if body and h.headers.get("Range", "").startswith("bytes="):
            start = int(h.headers["Range"][len("bytes="):].split("-")[0] or 0)
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", f'"{etag_of(name, data)}"')
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        if body:
            h.wfile.write(data[start:])

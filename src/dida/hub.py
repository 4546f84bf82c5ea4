"""Hugging Face Hub references (``hf://``): the one place where they are parsed and resolved to local files.

Every command that takes a checkpoint, and ``model.pretrained``, goes through ``resolve`` (called by
``dida.checkpoint.read_checkpoint``); downloads, the cache (``HF_HOME`` / ``HF_HUB_CACHE``), offline mode
(``HF_HUB_OFFLINE=1``), revisions, resumed downloads and progress bars are ``huggingface_hub``'s own.

Grammar (model repositories only)::

    hf://ORG/REPO                     the repository's weights (below), branch main
    hf://ORG/REPO/PATH                a file of the repository (PATH may contain '/')
    hf://ORG/REPO@REVISION[/PATH]     the Hub's own URI form: a branch, tag, commit or refs/pr/N
    hf://ORG/REPO/PATH@REVISION       the same, revision last

Without a PATH, a repository that holds a dida export (``config.yaml`` beside ``model.safetensors``, see
``dida export``) resolves to that folder (in the cache), any other to its weights file: ``model.safetensors``,
else ``pytorch_model.bin``.

Integrity: the Hub's cache names each file by its checksum (the sha256 of files stored with LFS, the git
blob sha1 of the others); a cached copy whose content does not match its name is refused. An export's
``dida_export.json`` also records the sha256 of its weight files, checked when the folder is read.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dida.errors import CheckpointError

__all__ = [
    "EXPORT_CONFIG", "EXPORT_META", "EXPORT_WEIGHTS", "HF_SCHEME", "WEIGHT_FILES", "HubError", "HubRef",
    "cache_dir", "cached_path", "export_files", "file_sha256", "is_export_folder", "is_hub_ref", "local_output_dir",
    "parse_ref", "resolve", "resolve_config", "verify_cached_file",
]

HF_SCHEME = "hf://"
# The weights file of a repository named without a file, in order of preference.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# A dida export (``dida export``): the weights of each model, the resolved config, the checksums.
EXPORT_WEIGHTS = {"model": "model.safetensors", "ema_model": "ema_model.safetensors"}
EXPORT_CONFIG = "config.yaml"
EXPORT_META = "dida_export.json"

_SEGMENT = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$")
_SPECIAL_REVISION = re.compile(r"^refs/(?:pr/\d+|convert/[\w.-]+)")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GIT_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_VERIFIED: dict[tuple[str, int, int], str] = {}  # (file, size, mtime_ns) -> sha256, for this process


class HubError(CheckpointError):
    """A Hub reference that cannot be used: malformed, unreachable, missing, not cached offline, corrupted."""


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf://`` reference.

    Attributes:
        repo_id: ``ORG/REPO``.
        filename: the path of a file in the repository, or None (the repository's weights or export).
        revision: a branch, tag, commit hash or ``refs/pr/N``; None means ``main``.
    """

    repo_id: str
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HF_SCHEME}{self.repo_id}{rev}{'/' + self.filename if self.filename else ''}"

    def file(self, filename: str | None) -> HubRef:
        return replace(self, filename=filename)

    def url(self, filename: str | None = None) -> str:
        """The download address of ``filename`` (default: this reference's file) on the configured endpoint."""
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, filename or self.filename or WEIGHT_FILES[0], revision=self.revision)

    def page(self) -> str:
        """The repository's file listing on the configured endpoint (where to download by hand)."""
        from huggingface_hub import constants

        return f"{constants.ENDPOINT}/{self.repo_id}/tree/{self.revision or 'main'}"


def is_hub_ref(ref: Any) -> bool:
    """Whether ``ref`` is an ``hf://`` reference (a string; paths never are)."""
    return isinstance(ref, str) and ref.startswith(HF_SCHEME)


def parse_ref(ref: str) -> HubRef:
    """Parse ``hf://ORG/REPO[@REV][/PATH]`` or ``hf://ORG/REPO/PATH@REV`` (see the module docstring).

    Raises:
        HubError: not an ``hf://`` reference, a dataset / space, a missing organisation, an empty revision,
            or a path with empty or ``..`` parts.
    """
    if not is_hub_ref(ref):
        raise HubError(f"{ref}: not a Hugging Face reference; write hf://ORG/REPO[/FILE][@REVISION].")
    body = ref[len(HF_SCHEME):]
    body = body.removeprefix("models/")
    if body.split("/", 1)[0] in ("datasets", "spaces", "buckets", "kernels"):
        raise HubError(f"{ref}: only model repositories hold weights; write hf://ORG/REPO[/FILE][@REVISION].")
    if body.count("@") > 1:
        raise HubError(f"{ref}: more than one '@'; write hf://ORG/REPO[/FILE][@REVISION].")
    revision: str | None = None
    if "@" in body:
        left, right = body.split("@", 1)
        if left.count("/") == 1:  # the Hub's form: ORG/REPO@REV[/PATH]
            special = _SPECIAL_REVISION.match(right)
            cut = special.end() if special else (right.find("/") if "/" in right else len(right))
            revision, rest = right[:cut], right[cut + 1:]
            body = left + (f"/{rest}" if rest else "")
        else:  # revision last: ORG/REPO/PATH@REV
            revision, body = right, left
        if not revision:
            raise HubError(f"{ref}: empty revision after '@'; name a branch, tag or commit, or drop the '@'.")
    parts = body.split("/")
    if len(parts) < 2:
        raise HubError(f"{ref}: name the organisation too: hf://ORG/REPO (e.g. hf://nvidia/mit-b5).")
    if not all(_SEGMENT.match(p) for p in parts[:2]):
        raise HubError(f"{ref}: '{'/'.join(parts[:2])}' is not a valid repository id (ORG/REPO).")
    path = parts[2:]
    if any(p in ("", ".", "..") for p in path):
        raise HubError(f"{ref}: the file path has an empty, '.' or '..' part.")
    return HubRef("/".join(parts[:2]), "/".join(path) or None, revision)


# --------------------------------------------------------------------------------------- checksums


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file (hex), remembered for this process while its size and mtime are unchanged."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 23):
                digest.update(chunk)
        _VERIFIED[key] = digest.hexdigest()
    return _VERIFIED[key]


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())  # git's object id
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def verify_cached_file(path: str | os.PathLike[str], what: str) -> None:
    """Check a file of the Hub cache against the checksum its blob is named by (a no-op elsewhere).

    Raises:
        HubError: the content does not match (a damaged or tampered copy): names the blob to delete.
    """
    blob = Path(path).resolve()
    if blob.parent.name != "blobs":
        return  # not a Hub cache blob (a local file, or a cache without symlinks): nothing to compare with
    etag = blob.name
    if _SHA256.match(etag):
        got, kind = file_sha256(blob), "sha256"
    elif _GIT_SHA1.match(etag):
        got, kind = _git_blob_sha1(blob), "git sha1"
    else:
        return
    if got != etag:
        raise HubError(
            f"{what}: the cached copy is corrupted ({kind} {got[:12]}..., the Hub's is {etag[:12]}...); "
            f"refusing to load it. Delete {blob} and fetch it again (dida weights get {what})."
        )


# -------------------------------------------------------------------------------------- resolution


def cache_dir() -> str:
    """The Hugging Face cache folder in use (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _import_hub() -> None:
    try:
        import huggingface_hub
    except ImportError:
        raise HubError(
            "hf:// references need the huggingface_hub package: pip install huggingface_hub "
            "(or download the file by hand and pass its path)."
        ) from None


class _Fetcher:
    """Downloads files of one repository into the cache; after one failure to reach the Hub, reads the cache only.

    ``optional`` files that are known not to exist (or, without network, are not cached) give None.
    """

    def __init__(self, ref: HubRef) -> None:
        self.ref = ref
        self.offline = _offline()
        self.local_only = self.offline
        self.unreachable = False

    def get(self, filename: str, revision: str | None = None, optional: bool = False) -> Path | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        ref = replace(self.ref, filename=filename, revision=revision or self.ref.revision)
        try:
            path = Path(hf_hub_download(ref.repo_id, filename, revision=ref.revision,
                                        local_files_only=self.local_only))
        except LocalEntryNotFoundError:
            if not self.local_only:  # the Hub could not be reached: from now on the cache only
                self.unreachable, self.local_only = True, True
            if optional:
                return None
            raise self.not_cached(ref) from None
        except GatedRepoError:
            raise HubError(
                f"{ref}: the repository is gated: accept its terms on {ref.page()} and log in "
                "(hf auth login, or set HF_TOKEN)."
            ) from None
        except RepositoryNotFoundError:
            raise HubError(
                f"{ref}: no such repository on the Hub ({ref.repo_id}), or it is private: check the name, "
                "or log in (hf auth login, or set HF_TOKEN) if you have access."
            ) from None
        except RevisionNotFoundError:
            raise HubError(
                f"{ref}: the repository has no revision '{ref.revision}' (a branch, tag or commit): check the "
                "name after '@', or drop it for the main branch."
            ) from None
        except EntryNotFoundError:  # the repository and revision exist, the file does not
            if optional:
                return None
            raise HubError(
                f"{ref}: the repository has no file '{filename}' at {ref.revision or 'main'}; check the path "
                f"against {ref.page()}."
            ) from None
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", "?")
            raise HubError(
                f"{ref}: the Hub refused the download (HTTP {status}: {str(e).splitlines()[0][:120]}); try "
                f"again later, or download {ref.url()} by hand and pass its local path."
            ) from None
        except OSError as e:  # writing into the cache: disk full, no permission
            raise HubError(
                f"{ref}: cannot store the download in {cache_dir()} ({type(e).__name__}: {e}); free some space, "
                "fix the permissions, or point HF_HOME / HF_HUB_CACHE elsewhere."
            ) from None
        verify_cached_file(path, str(ref))
        return path

    def not_cached(self, ref: HubRef) -> HubError:
        """The one-line error for a file that is neither in the cache nor downloadable now."""
        by_hand = f"or download {ref.url()} by hand and pass its local path instead"
        if self.offline:
            return HubError(
                f"{ref}: not in the Hugging Face cache ({cache_dir()}) and HF_HUB_OFFLINE=1 forbids downloading "
                f"it. Fetch it where the Hub is reachable (dida weights get {ref}), {by_hand}."
            )
        from huggingface_hub import constants

        return HubError(
            f"{ref}: cannot reach the Hugging Face Hub ({constants.ENDPOINT}) and the file is not in the cache "
            f"({cache_dir()}). Check the connection or proxy (HF_ENDPOINT for a mirror), {by_hand}."
        )


def _snapshot_commit(path: Path) -> str | None:
    """The commit of a file inside the cache's ``snapshots/<commit>/`` folder."""
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def _resolve_repo(ref: HubRef, which: str | None) -> Path:
    """A repository named without a file: its dida export (a folder), else its weights file."""
    fetch = _Fetcher(ref)
    config = fetch.get(EXPORT_CONFIG, optional=True)
    if config is not None:
        commit = _snapshot_commit(config) or ref.revision  # every file of the export from the same commit
        fetch.get(EXPORT_META, revision=commit, optional=True)
        names = [EXPORT_WEIGHTS[which]] if which in EXPORT_WEIGHTS else list(EXPORT_WEIGHTS.values())
        found = [fetch.get(name, revision=commit, optional=True) for name in names]
        if not any(found):
            if fetch.local_only:
                raise fetch.not_cached(replace(ref, filename=names[0], revision=commit))
            raise HubError(
                f"{ref}: this dida export has no {' or '.join(names)}"
                + (" (the run had no EMA teacher; use --which model)." if which == "ema_model" else ".")
            )
        return config.parent
    for name in WEIGHT_FILES:
        path = fetch.get(name, optional=True)
        if path is not None:
            return path
    if fetch.local_only:
        raise fetch.not_cached(ref)
    raise HubError(
        f"{ref}: the repository has neither {' nor '.join(WEIGHT_FILES)}; name the file: "
        f"hf://{ref.repo_id}/FILE (see {ref.page()})."
    )


def is_export_folder(path: str | os.PathLike[str]) -> bool:
    """A folder written by ``dida export``: ``config.yaml`` and at least one of its weight files."""
    path = Path(path)
    return path.is_dir() and (path / EXPORT_CONFIG).is_file() and any(
        (path / name).is_file() for name in EXPORT_WEIGHTS.values())


def export_files(path: str | os.PathLike[str]) -> dict[str, Path]:
    """The weight files present in an export folder, by model (``model`` / ``ema_model``)."""
    path = Path(path)
    return {which: path / name for which, name in EXPORT_WEIGHTS.items() if (path / name).is_file()}


def resolve(ref: str | os.PathLike[str], *, which: str | None = None) -> Path:
    """The local path of a checkpoint reference: downloads ``hf://`` references into the Hub cache.

    Args:
        ref: an ``hf://`` reference (see the module docstring) or a local path (returned unchanged).
        which: for a repository holding a dida export, the model whose weights are needed (``model`` or
            ``ema_model``); None fetches both.

    Returns:
        A file, or an export folder (``is_export_folder``) for an export repository.

    Raises:
        HubError: one line naming the reference and what to do (no network, no such repository, revision or
            file, offline without a cached copy, a corrupted cached copy, huggingface_hub not installed).
    """
    if not is_hub_ref(ref):
        return Path(ref)
    parsed = parse_ref(str(ref))
    _import_hub()
    if parsed.filename is None:
        return _resolve_repo(parsed, which)
    path = _Fetcher(parsed).get(parsed.filename)
    assert path is not None
    return path


def cached_path(ref: str) -> Path | None:
    """The cached copy of an ``hf://`` file (or of a repository's weights), without any network access."""
    from huggingface_hub import try_to_load_from_cache

    parsed = parse_ref(ref)
    for name in [parsed.filename] if parsed.filename else WEIGHT_FILES:
        found = try_to_load_from_cache(parsed.repo_id, name, revision=parsed.revision)
        if isinstance(found, str):  # else None (unknown) or a marker that the file does not exist
            return Path(found)
    return None


def local_output_dir(ref: str | os.PathLike[str], resolved: Path) -> Path:
    """Where outputs about a checkpoint go by default: beside a local file (in an export folder), and under
    ``work_dirs/hub/ORG--REPO`` for an ``hf://`` reference (never inside the Hub cache)."""
    if is_hub_ref(ref):
        return Path("work_dirs") / "hub" / parse_ref(str(ref)).repo_id.replace("/", "--")
    resolved = resolved.resolve()
    return resolved if resolved.is_dir() else resolved.parent


def resolve_config(name_or_ref: str) -> str:
    """A ``CONFIG`` argument with ``hf://`` repositories replaced by their (cached) export folder.

    Raises:
        HubError: the repository is not a dida export (it has no ``config.yaml``).
    """
    if not is_hub_ref(name_or_ref):
        return name_or_ref
    path = resolve(name_or_ref, which="model")
    if not is_export_folder(path):
        raise HubError(
            f"{name_or_ref}: holds no dida export (no {EXPORT_CONFIG}), so it cannot serve as CONFIG: give a "
            "preset or YAML first, the reference as CHECKPOINT."
        )
    return str(path)

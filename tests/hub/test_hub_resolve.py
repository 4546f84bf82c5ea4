"""``hf://`` references: the grammar, and resolution through ``huggingface_hub``'s cache in offline mode.

The cache is built in the library's own layout (``hub_helpers.add_to_cache``) with generated weights in
the Hub's SegFormer layout; resolution, revision pinning, the checksum refusal of a corrupted cached copy
and the offline messages all go through the real client.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hub_helpers import (
    TINY_MIT,
    add_to_cache,
    commit_id,
    hf_segformer_state,
    safetensors_bytes,
    tiny_mit_state,
    torch_bytes,
)
from huggingface_hub import hf_hub_url

from dida.checkpoint import load_checkpoint, read_checkpoint
from dida.cli import main
from dida.config import ModelCfg
from dida.hub import HubError, HubRef, is_hub_ref, parse_ref, resolve
from dida.models import build_model

REPO = "acme/mit-tiny"


# ------------------------------------------------------------------------------------------- grammar


@pytest.mark.parametrize(("ref", "expected"), [
    ("hf://nvidia/mit-b5", HubRef("nvidia/mit-b5")),
    ("hf://nvidia/mit-b5/pytorch_model.bin", HubRef("nvidia/mit-b5", "pytorch_model.bin")),
    ("hf://org/repo/sub/dir/w.safetensors", HubRef("org/repo", "sub/dir/w.safetensors")),
    ("hf://org/repo/w.pth@v1.0", HubRef("org/repo", "w.pth", "v1.0")),
    ("hf://org/repo@v1.0/w.pth", HubRef("org/repo", "w.pth", "v1.0")),
    ("hf://org/repo@main", HubRef("org/repo", None, "main")),
    ("hf://org/repo@refs/pr/3/w.pth", HubRef("org/repo", "w.pth", "refs/pr/3")),
    ("hf://org/repo/w.pth@refs/pr/3", HubRef("org/repo", "w.pth", "refs/pr/3")),
    ("hf://models/org/repo", HubRef("org/repo")),
    ("hf://org/repo@" + "a" * 40, HubRef("org/repo", None, "a" * 40)),
])
def test_reference_grammar(ref, expected):
    assert parse_ref(ref) == expected
    assert parse_ref(str(expected)) == expected  # str() is the Hub's canonical form, parsed back alike


@pytest.mark.parametrize(("ref", "says"), [
    ("hf://mit-b5", "name the organisation"),
    ("hf://org/repo@", "empty revision"),
    ("hf://org/repo@a@b", "more than one '@'"),
    ("hf://datasets/org/data", "only model repositories"),
    ("hf://org/repo/../x", "'..'"),
    ("hf://org/re po", "not a valid repository id"),
    ("nvidia/mit-b5", "not a Hugging Face reference"),
])
def test_malformed_references_are_one_clear_line(ref, says):
    with pytest.raises(HubError, match=says) as info:
        parse_ref(ref)
    assert "\n" not in str(info.value)


def test_paths_are_not_references(tmp_path):
    assert not is_hub_ref(tmp_path / "hf:" / "x")
    assert resolve(tmp_path / "w.pth") == tmp_path / "w.pth"
    assert resolve("pretrained/mit_b5.pth") == Path("pretrained/mit_b5.pth")


# ----------------------------------------------------------------------------------- offline cache


def _tiny_model():
    return build_model(ModelCfg(num_classes=4, **TINY_MIT), generator=torch.Generator().manual_seed(9))


def _assert_backbone_equals(model, mit):
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, mit[k], rtol=0, atol=0, msg=k)


def test_repo_without_file_prefers_safetensors_then_bin(hf_cache):
    mit_a, mit_b = tiny_mit_state(1), tiny_mit_state(2)
    add_to_cache(hf_cache, REPO, {"model.safetensors": safetensors_bytes(hf_segformer_state(mit_a)),
                                  "pytorch_model.bin": torch_bytes(hf_segformer_state(mit_b)),
                                  "config.json": b"{}"}, commit_id("c1"))
    add_to_cache(hf_cache, "acme/bin-only", {"pytorch_model.bin": torch_bytes(hf_segformer_state(mit_b))},
                 commit_id("c2"))
    assert resolve(f"hf://{REPO}").name == "model.safetensors"
    assert resolve("hf://acme/bin-only").name == "pytorch_model.bin"
    # Through the checkpoint reader, as every command and model.pretrained use it.
    model = _tiny_model()
    info = load_checkpoint(model.backbone, f"hf://{REPO}")
    assert info["format"] == "hf"
    _assert_backbone_equals(model, mit_a)
    load_checkpoint(model, "hf://acme/bin-only")  # a segmentor: the file goes into its backbone
    _assert_backbone_equals(model, mit_b)


def test_revision_pinning(hf_cache):
    old, new = tiny_mit_state(3), tiny_mit_state(4)
    c_old, c_new = commit_id("old"), commit_id("new")
    add_to_cache(hf_cache, REPO, {"model.safetensors": safetensors_bytes(hf_segformer_state(old))}, c_old,
                 refs=("v1.0",))
    add_to_cache(hf_cache, REPO, {"model.safetensors": safetensors_bytes(hf_segformer_state(new))}, c_new,
                 refs=("main",))
    model = _tiny_model()
    for ref, expected in [(f"hf://{REPO}", new), (f"hf://{REPO}@main", new), (f"hf://{REPO}@v1.0", old),
                          (f"hf://{REPO}@{c_old}", old), (f"hf://{REPO}/model.safetensors@{c_old}", old),
                          (f"hf://{REPO}@{c_new}/model.safetensors", new)]:
        load_checkpoint(model.backbone, ref)
        _assert_backbone_equals(model, expected)
    assert c_old in str(resolve(f"hf://{REPO}@v1.0"))
    with pytest.raises(HubError, match=r"HF_HUB_OFFLINE=1 forbids downloading") as info:
        resolve(f"hf://{REPO}@v2.0")
    assert "@v2.0" in str(info.value)


def test_offline_without_a_cached_copy_says_what_to_do(hf_cache):
    with pytest.raises(HubError) as info:
        read_checkpoint("hf://nvidia/mit-b5")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("hf://nvidia/mit-b5: not in the Hugging Face cache (")
    assert str(hf_cache) in msg and "HF_HUB_OFFLINE=1" in msg
    assert "dida weights get hf://nvidia/mit-b5" in msg
    # the file's download address on the configured endpoint, as huggingface_hub spells it
    assert f"{hf_hub_url('nvidia/mit-b5', 'model.safetensors')} by hand" in msg
    with pytest.raises(HubError, match="resolve/main/w.pth by hand"):
        resolve("hf://nvidia/mit-b5/w.pth")


def test_corrupted_cached_copy_is_refused(hf_cache):
    data = safetensors_bytes(hf_segformer_state(tiny_mit_state(5)))
    snapshot = add_to_cache(hf_cache, REPO, {"model.safetensors": data}, commit_id("c"))
    blob = (snapshot / "model.safetensors").resolve()
    damaged = bytearray(data)
    damaged[-1] ^= 0xFF  # one flipped bit in a tensor: still a valid safetensors file
    blob.write_bytes(bytes(damaged))
    with pytest.raises(HubError, match="the cached copy is corrupted") as info:
        read_checkpoint(f"hf://{REPO}")
    assert str(blob) in str(info.value) and "\n" not in str(info.value)
    # A small non-LFS file is checked against its git blob sha1 the same way.
    snapshot = add_to_cache(hf_cache, "acme/text", {"notes.txt": b"hello"}, commit_id("t"))
    (snapshot / "notes.txt").resolve().write_bytes(b"hellO")
    with pytest.raises(HubError, match="git sha1"):
        resolve("hf://acme/text/notes.txt")


def test_missing_local_checkpoint_names_the_hub_copy(tmp_path):
    from dida.errors import CheckpointError

    with pytest.raises(CheckpointError) as info:
        read_checkpoint(tmp_path / "pretrained" / "mit_b5.pth")
    msg = str(info.value)
    assert "no such file" in msg and "model.pretrained=hf://nvidia/mit-b5" in msg and "\n" not in msg


def test_model_pretrained_accepts_a_hub_reference(hf_cache):
    """``model.pretrained=hf://...`` loads into the student and the frozen feature-distance model."""
    from dida.config import load_config
    from dida.engine.train import build_models
    from dida.uda.terms.feature_distance import build as build_feature_distance

    mit = tiny_mit_state(6)
    add_to_cache(hf_cache, REPO, {"pytorch_model.bin": torch_bytes(hf_segformer_state(mit))}, commit_id("p"))
    overrides = [f"model.{k}={v}" for k, v in TINY_MIT.items()] + ["model.num_classes=4", "uda.feature_distance.classes=[1,2]",
                                                                  f"model.pretrained=hf://{REPO}"]
    cfg = load_config("tiny_cpu", [o.replace(" ", "") for o in overrides])
    student, _ = build_models(cfg, torch.device("cpu"))
    _assert_backbone_equals(student, mit)
    _assert_backbone_equals(build_feature_distance(cfg, None).imnet_model, mit)


def test_cli_error_is_one_line(hf_cache, capsys):
    rc = main(["test", "hf://acme/nothing-here"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "dida test: error: hf://acme/nothing-here: not in the Hugging Face cache" in err

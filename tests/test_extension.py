"""The two seams, used from outside the package: a new training term and a new backbone, each defined in
this file only, train the tiny preset end to end (and the backbone's segmentor is evaluated and reloaded)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dida.config import load_config
from dida.data.fake import write_fake_cityscapes, write_fake_gta
from dida.engine.train import train
from dida.models import BACKBONES, BackboneEntry, build_model
from dida.uda.terms import TERMS, StepContext, Term, TermBuildContext, register_term


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_fake_gta(root / "gta", n=6, size=(192, 108), seed=0)
    write_fake_cityscapes(root / "cs", splits=("train", "val"), n_per_split=3, size=(256, 128), seed=1)
    return root


def _tiny(data_root: Path, run_dir: Path, *extra: str):
    return load_config("tiny_cpu", [f"run.dir={run_dir}", f"data.source.root={data_root / 'gta'}",
                                    f"data.target.root={data_root / 'cs'}", f"data.val.root={data_root / 'cs'}",
                                    *extra])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------ a term


@dataclass
class EntropyCfg:
    """Entropy minimisation of the student's prediction on the mixed image (a classic UDA loss)."""

    enabled: bool = False
    weight: float = 0.01


class EntropyTerm(Term):
    """``loss/entropy = weight * mean_x H(softmax(z_mix(x)))``, backpropagated with the mixed loss."""

    needs_teacher = True

    def __init__(self, *, weight: float) -> None:
        super().__init__()
        self.weight = weight
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))  # state saved in checkpoints

    def on_mixed(self, ctx: StepContext) -> dict[str, Tensor]:
        assert ctx.mixed is not None and ctx.mixed.output is not None
        logp = F.log_softmax(ctx.mixed.output.logits.float(), dim=1)
        self.calls += 1
        return {"loss/entropy": self.weight * -(logp.exp() * logp).sum(dim=1).mean()}


def _build_entropy(cfg, ctx: TermBuildContext) -> EntropyTerm:
    return EntropyTerm(weight=cfg.uda.entropy.weight)


@pytest.fixture
def entropy_term(monkeypatch):
    monkeypatch.setattr("dida.uda.terms.TERMS", dict(TERMS))  # restored after the test
    register_term("entropy", _build_entropy, EntropyCfg)
    yield


def test_a_term_defined_here_trains_with_the_others(data_root, tmp_path, entropy_term):
    cfg = _tiny(data_root, tmp_path / "run", "uda.entropy.enabled=true", "uda.entropy.weight=0.5",
                "uda.dual_level.enabled=true", "uda.bank.init=random", "uda.bank.size=19", "train.max_iters=2")
    assert cfg.uda.entropy == EntropyCfg(enabled=True, weight=0.5)
    run = train(cfg)
    rows = _rows(run / "metrics.jsonl")
    assert all({"loss/src_ce", "loss/feat_dist", "loss/mix_ce", "loss/instance", "loss/entropy"} <= set(r)
               for r in rows)
    assert all(0 < r["loss/entropy"] < 0.5 * torch.log(torch.tensor(19.0)).item() + 1e-6 for r in rows)
    ckpt = torch.load(run / "latest.pth", weights_only=True)
    assert list(ckpt["terms"]) == ["feature_distance", "dual_level", "entropy"]
    assert int(ckpt["terms"]["entropy"]["calls"]) == 2
    # the resolved config (with the new section) round-trips, and the run resumes with the term's state
    assert load_config(str(run / "config.yaml")).uda.entropy.weight == 0.5


def test_a_registered_term_is_validated_like_a_built_in_one(entropy_term):
    from dida.errors import ConfigError

    with pytest.raises(ConfigError, match="uda.entropy.wieght"):
        load_config("tiny_cpu", ["uda.entropy.wieght=1"])
    with pytest.raises(ConfigError, match="uda.entropy.weight"):
        load_config("tiny_cpu", ["uda.entropy.weight=abc"])
    with pytest.raises(ValueError, match="built-in"):
        register_term("feature_distance", _build_entropy, EntropyCfg)
    from dida.config import describe_schema

    assert "entropy:" in describe_schema()


def test_without_registration_the_key_is_unknown():
    from dida.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        load_config("tiny_cpu", ["uda.entropy.enabled=true"])


# -------------------------------------------------------------------------------------- a backbone


class TinyConvBackbone(nn.Module):
    """Four strided conv stages (strides 4, 8, 16, 32): the smallest thing that meets the protocol."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 24, 32)) -> None:
        super().__init__()
        self.out_channels = tuple(widths)
        self.strides = (4, 8, 16, 32)
        chans = (3, *widths)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, stride=4 if i == 0 else 2, padding=1),
                          nn.BatchNorm2d(chans[i + 1]), nn.ReLU())
            for i in range(4)
        )

    def forward(self, img: Tensor) -> list[Tensor]:
        out, x = [], img
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


@pytest.fixture
def tiny_backbone(monkeypatch):
    monkeypatch.setitem(BACKBONES, "tiny_conv", BackboneEntry(lambda cfg: TinyConvBackbone()))
    yield


def test_a_backbone_defined_here_trains_evaluates_and_reloads(data_root, tmp_path, tiny_backbone):
    from dida.checkpoint import load_checkpoint, model_cfg_from_checkpoint, read_checkpoint

    cfg = _tiny(data_root, tmp_path / "run", "model.backbone=tiny_conv", "train.max_iters=2",
                "train.eval_interval=2")
    run = train(cfg)
    assert 0.0 <= _rows(run / "eval.jsonl")[-1]["mIoU"] <= 1.0
    ckpt = read_checkpoint(run / "latest.pth")
    model_cfg = model_cfg_from_checkpoint(ckpt)
    assert model_cfg is not None and model_cfg.backbone == "tiny_conv"
    model = build_model(model_cfg)
    assert isinstance(model.backbone, TinyConvBackbone)
    load_checkpoint(model, ckpt, which="ema_model", source=run / "latest.pth")
    model.eval()
    img = torch.randn(1, 3, 64, 96)
    out = model.predict(img)
    assert out.logits.shape == (1, 19, 16, 24) and out.embedding.shape[1] == cfg.model.decoder_channels

    from dida.data import build_uda_datasets
    from dida.engine.evaluate import evaluate

    _, val = build_uda_datasets(cfg.data, seed=0)
    metrics = evaluate(model, val, device="cpu", progress=False)
    assert metrics["num_images"] == 3 and 0.0 <= metrics["mIoU"] <= 1.0

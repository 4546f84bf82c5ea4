"""Foundation ViT backbones (DINOv2 / DINOv3 through ``transformers``): Hub-layout weights, parity with
``transformers``' own models, the pyramid, layer-wise lr decay and freezing, and the CLI end to end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from dida.config import ModelCfg, ViTCfg, load_config
from dida.errors import CheckpointError, ConfigError

transformers = pytest.importorskip("transformers")

V2_TINY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "patch_size": 14, "image_size": 56}
V3_TINY = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
           "patch_size": 16, "num_register_tokens": 4}


def _model_cfg(backbone: str, **vit) -> ModelCfg:
    return ModelCfg(backbone=backbone, drop_path_rate=0.0, vit=ViTCfg(**vit))


def _tiny_v2_cfg(**extra) -> ModelCfg:
    return _model_cfg("dinov2_vits14", hidden_size=32, num_layers=4, num_heads=2, image_size=56, **extra)


def _hub_folder(tmp: Path, model) -> Path:
    """``model.save_pretrained`` (transformers writes the Hub's key names) -> model.safetensors + config.json."""
    model.save_pretrained(tmp)
    assert {p.name for p in tmp.iterdir()} == {"model.safetensors", "config.json"}
    return tmp


@pytest.fixture(scope="module")
def dinov2_hub(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**V2_TINY))
    with torch.no_grad():  # non-trivial layer scales and norms
        for name, p in model.named_parameters():
            if name.endswith(("lambda1", "norm1.weight", "layernorm.weight")):
                p.uniform_(0.5, 1.5)
    return _hub_folder(tmp_path_factory.mktemp("dinov2_hub"), model)


def _reference_maps(ref, x: torch.Tensor, blocks, num_prefix: int, norm) -> list[torch.Tensor]:
    """transformers' own model: hidden states of ``blocks`` after the final LayerNorm, as maps."""
    hidden = ref(pixel_values=x, output_hidden_states=True).hidden_states
    p = ref.config.patch_size
    out = []
    for i in blocks:
        tokens = norm(hidden[i])[:, num_prefix:]
        out.append(tokens.reshape(x.shape[0], x.shape[2] // p, x.shape[3] // p, -1).permute(0, 3, 1, 2))
    return out


def test_dinov2_hub_folder_loads_strictly_and_matches_transformers(dinov2_hub):
    from safetensors.torch import load_file

    from dida.checkpoint import load_checkpoint
    from dida.models.registry import build_backbone

    assert any(".attention.attention.query." in k for k in load_file(dinov2_hub / "model.safetensors"))  # Hub names
    backbone = build_backbone(_tiny_v2_cfg()).eval()
    pyramid_before = {k: v.clone() for k, v in backbone.pyramid.state_dict().items()}
    info = load_checkpoint(backbone, dinov2_hub)  # the folder: its model.safetensors
    assert info["format"] == "dinov2" and info["target"] == "backbone"
    assert info["kept"] == sorted(f"pyramid.{k}" for k in pyramid_before)  # the pyramid keeps its init
    assert info["num_tensors"] == len(load_file(dinov2_hub / "model.safetensors"))
    assert all(torch.equal(v, backbone.pyramid.state_dict()[k]) for k, v in pyramid_before.items())

    ref = transformers.Dinov2Model.from_pretrained(dinov2_hub).eval()  # the peer, with its own conversion
    assert backbone.out_indices == (1, 2, 3, 4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # a multiple of the patch size, at the pretraining grid (56 x 56) and off it (42 x 70)
        for h, w in ((56, 56), (42, 70)):
            x = torch.randn(2, 3, h, w, generator=g)
            ours = backbone.hidden_maps(x)
            theirs = _reference_maps(ref, x, backbone.out_indices, 1, ref.layernorm)
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # not a multiple of 14 (45 x 61): the forward pads to the stride-16 grid, 56 x 70 px
        x = torch.randn(1, 3, 45, 61, generator=g)
        padded = backbone.pad(x)
        assert padded.shape[-2:] == (56, 70) and torch.equal(padded[..., :45, :61], x)
        assert padded[..., 45:, :].abs().sum() == 0 and padded[..., 61:].abs().sum() == 0
        theirs = _reference_maps(ref, padded, backbone.out_indices, 1, ref.layernorm)
        for a, b in zip(backbone.hidden_maps(padded), theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        feats = backbone(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(12, 16), (6, 8), (3, 4), (2, 2)]  # ceil(45/s), ceil(61/s)
    assert backbone.out_channels == (32, 32, 32, 32) and backbone.strides == (4, 8, 16, 32)


def test_stride16_resampling_is_aligned_with_the_pixels():
    """A map whose value is each token's centre (px) becomes each stride-16 cell's centre."""
    from dida.models.foundation import FoundationViT

    backbone = FoundationViT.__new__(FoundationViT)  # only the resampling arithmetic is used
    torch.nn.Module.__init__(backbone)
    backbone.patch_size = 14
    tokens = 5  # a 64-px side, padded to 70
    centres = (torch.arange(tokens, dtype=torch.float64) + 0.5) * 14
    grid = centres.view(1, 1, 1, -1).expand(1, 1, tokens, tokens)
    out = backbone.to_stride16([grid], (4, 4))[0]
    torch.testing.assert_close(out[0, 0, 0], (torch.arange(4, dtype=torch.float64) + 0.5) * 16)


def test_dinov3_hub_weights_load_and_match_transformers(tmp_path):
    from dida.checkpoint import load_checkpoint
    from dida.models.registry import build_backbone

    torch.manual_seed(0)
    folder = _hub_folder(tmp_path / "hub", transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**V3_TINY)))
    backbone = build_backbone(_model_cfg("dinov3_vits16", hidden_size=32, num_layers=2, num_heads=2)).eval()
    info = load_checkpoint(backbone, folder / "model.safetensors")
    assert info["format"] == "dinov3" and backbone.out_indices == (1, 1, 2, 2)
    ref = transformers.DINOv3ViTModel.from_pretrained(folder).eval()
    x = torch.randn(1, 3, 40, 50, generator=torch.Generator().manual_seed(2))  # not multiples of 16
    with torch.no_grad():
        padded = backbone.pad(x)
        assert padded.shape[-2:] == (48, 64)
        theirs = _reference_maps(ref, padded, backbone.out_indices, 5, ref.norm)
        for a, b in zip(backbone.hidden_maps(padded), theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        feats = backbone(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(10, 13), (5, 7), (3, 4), (2, 2)]
    torch.testing.assert_close(feats[2], theirs[2])  # patch 16: the identity level is the block itself


def test_published_architectures_convert_onto_the_backbone_and_are_recognised():
    """ViT-S/14 and the giant's fused SwiGLU (Hub layout), on the meta device: names and shapes only."""
    from dida.checkpoint.load import infer_model_fields
    from dida.models import foundation_weights as fw
    from dida.models.foundation import VIT_VARIANTS, build_foundation_vit

    for name in ("dinov2_vits14", "dinov2_vitg14"):
        v = VIT_VARIANTS[name]
        cfg = transformers.Dinov2Config(hidden_size=v.hidden_size, num_hidden_layers=v.num_layers,
                                        num_attention_heads=v.num_heads, image_size=518,
                                        use_swiglu_ffn=v.gated_mlp)
        with torch.device("meta"):
            hub = transformers.Dinov2Model(cfg)
            ours = build_foundation_vit(ModelCfg(backbone=name))
        sd = {f"dinov2.{k}": t for k, t in hub.state_dict().items()}  # Dinov2ForImageClassification's prefix
        if v.gated_mlp:  # the Hub's fused layout
            sd = _fuse_swiglu(sd)
        sd["classifier.weight"] = torch.empty(1000, 2 * v.hidden_size, device="meta")
        assert fw.detect_dinov2_weights(sd) == "dinov2" and fw.detect_dinov3_weights(sd) is None
        converted, dropped = fw.dinov2_weights_to_backbone(sd)
        assert dropped == ["classifier.weight"]
        expected = {k: t.shape for k, t in ours.state_dict().items() if not k.startswith("pyramid.")}
        assert {k: t.shape for k, t in converted.items()} == expected
        assert infer_model_fields(converted) == {"backbone": name}


def _fuse_swiglu(sd: dict) -> dict:
    out = {}
    for k, t in sd.items():
        if ".mlp.gate_proj." in k:
            out[k.replace("gate_proj", "weights_in")] = torch.cat([t, sd[k.replace("gate_proj", "up_proj")]])
        elif ".mlp.down_proj." in k:
            out[k.replace("down_proj", "weights_out")] = t
        elif ".mlp.up_proj." not in k:
            out[k] = t
    return out


def test_unknown_keys_and_missing_halves_are_refused(dinov2_hub):
    from dida.checkpoint import read_checkpoint
    from dida.models import foundation_weights as fw

    sd = read_checkpoint(dinov2_hub)
    with pytest.raises(CheckpointError, match="unexpected keys in a DINOv2 state dict: encoder.layer.0.extra"):
        fw.dinov2_weights_to_backbone({**sd, "encoder.layer.0.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="gate and up projections"):  # a gated MLP's lone half
        fw.dinov2_weights_to_backbone({**sd, "encoder.layer.0.mlp.gate_proj.weight": torch.zeros(4, 32)})


def test_model_config_is_inferred_from_hub_weights(dinov2_hub):
    from dida.checkpoint import model_cfg_from_checkpoint, read_checkpoint

    cfg = model_cfg_from_checkpoint(read_checkpoint(dinov2_hub))
    assert cfg is not None and cfg.backbone == "dinov2_vits14"
    assert (cfg.vit.hidden_size, cfg.vit.num_layers, cfg.vit.patch_size, cfg.vit.image_size) == (32, 4, 14, 56)


def test_layer_decay_freezing_and_token_decay(dinov2_hub):
    from dida.engine.optim import build_optimizer
    from dida.models import build_model

    cfg = _tiny_v2_cfg(frozen_blocks=1)
    cfg.num_classes, cfg.decoder_channels = 4, 16
    model = build_model(cfg, torch.Generator().manual_seed(0))
    backbone = model.backbone
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith(("backbone.vit.embeddings.", "backbone.vit.encoder.layer.0."))}
    opt = build_optimizer(model.named_parameters(), lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                          head_lr_mult=10.0, norm_decay_mult=0.0, layer_decay=0.5, backbone=backbone)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert not any(id(params[n]) in group_of for n in frozen)

    def lr(name):
        return group_of[id(params[name])]["base_lr"]

    def decay(name):
        return group_of[id(params[name])]["weight_decay"]

    L = 4
    for i in range(1, L):  # block i+1 (1-based) of 4
        assert lr(f"backbone.vit.encoder.layer.{i}.mlp.fc1.weight") == pytest.approx(0.5 ** (L - i))
        assert decay(f"backbone.vit.encoder.layer.{i}.mlp.fc1.weight") == 0.01
        assert decay(f"backbone.vit.encoder.layer.{i}.norm1.weight") == 0.0
    assert lr("backbone.pyramid.up8.weight") == 1.0 and lr("backbone.vit.layernorm.weight") == 1.0
    assert lr("decode_head.conv_seg.weight") == 10.0
    assert decay("backbone.pyramid.up4_norm.weight") == 0.0
    # the embeddings are frozen here; unfrozen, they are the deepest layer and their tokens get no decay
    model2 = build_model(_tiny_v2_cfg(), torch.Generator().manual_seed(0))
    opt2 = build_optimizer(model2.named_parameters(), lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                           head_lr_mult=10.0, norm_decay_mult=0.0, layer_decay=0.5, backbone=model2.backbone)
    g2 = {id(p): g for g in opt2.param_groups for p in g["params"]}
    p2 = dict(model2.named_parameters())
    emb = g2[id(p2["backbone.vit.embeddings.patch_embeddings.projection.weight"])]
    assert emb["base_lr"] == pytest.approx(0.5 ** 5) and emb["weight_decay"] == 0.01
    for name in ("cls_token", "position_embeddings"):
        assert g2[id(p2[f"backbone.vit.embeddings.{name}"])]["weight_decay"] == 0.0
    # the masked-image-modelling token is never read by segmentation: frozen, outside the optimizer
    mask_token = p2["backbone.vit.embeddings.mask_token"]
    assert not mask_token.requires_grad and id(mask_token) not in g2
    # a frozen block gets no gradient; the first trained one does
    out = model(torch.randn(1, 3, 32, 32))
    out.logits.sum().backward()
    assert params["backbone.vit.encoder.layer.0.mlp.fc1.weight"].grad is None
    assert params["backbone.vit.encoder.layer.1.mlp.fc1.weight"].grad is not None
    with pytest.raises(ValueError, match="numbers its layers"):
        build_optimizer([], lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, head_lr_mult=1.0,
                        norm_decay_mult=0.0, layer_decay=0.9, backbone=torch.nn.Linear(1, 1))


def test_drop_path_is_dida_s_and_off_in_the_teacher():
    from dida.models.foundation import build_foundation_vit
    from dida.uda.ema import set_teacher_modes

    cfg = _tiny_v2_cfg(frozen_blocks=1)
    cfg.drop_path_rate = 0.3
    backbone = build_foundation_vit(cfg)
    rates = [getattr(b.drop_path, "p", 0.0) for b in backbone.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])  # linear; 0 in the frozen block
    set_teacher_modes(backbone)
    assert backbone.training and not any(b.drop_path.training for b in backbone.blocks[1:])


def test_config_errors_are_one_line(monkeypatch):
    from dida.models.registry import build_backbone

    with pytest.raises(ConfigError, match="model.vit.out_indices"):
        build_backbone(_tiny_v2_cfg(out_indices=[1, 2, 3, 5]))
    with pytest.raises(ConfigError, match="model.vit.frozen_blocks"):
        build_backbone(_tiny_v2_cfg(frozen_blocks=5))
    with pytest.raises(ConfigError, match="model.vit.out_indices"):
        load_config(None, ["model.vit.out_indices=[3,2,1,4]"])
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        load_config(None, ["optim.layer_decay=0"])
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'dida\[hf\]'") as err:
        build_backbone(_tiny_v2_cfg())
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ the CLI end to end


def test_synth_dinov2s_trains_then_test_infer_and_bank_build_work(fake_data, tmp_path, capsys):
    """``dida train synth_dinov2s`` (random ViT-S/14-shaped weights, 4 blocks) a few iterations, then
    ``dida test``, ``dida infer`` and ``dida bank build`` on its checkpoint."""
    import numpy as np

    from dida.cli import main

    root = fake_data / "tiny_cpu"
    run = tmp_path / "run"
    sizes = ["data.source.img_scale=[128,72]", "data.source.crop_size=[64,64]", "data.target.img_scale=[128,64]",
             "data.target.crop_size=[64,64]", "data.val.img_scale=[128,64]", "data.num_workers=0",
             "uda.mic.block_size=8", "uda.pseudo_weight_ignore_top=2", "uda.pseudo_weight_ignore_bottom=15"]
    rc = main(["train", "synth_dinov2s", f"run.dir={run}", f"data.source.root={root / 'gta'}",
               f"data.target.root={root / 'cs'}", f"data.val.root={root / 'cs'}", "train.max_iters=2",
               "train.checkpoint_interval=2", "train.eval_interval=0", "train.log_interval=1",
               "run.device=cpu", *sizes])
    assert rc == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [1, 2] and {"loss/src_ce", "loss/mix_ce", "loss/mic"} <= set(rows[-1])
    assert all(math.isfinite(v) for r in rows for v in r.values())
    ckpt = torch.load(run / "latest.pth", weights_only=True)
    assert ckpt["model"]["backbone.vit.encoder.layer.3.mlp.fc1.weight"].shape == (1536, 384)

    assert main(["test", str(run), str(run / "latest.pth"), "--out", str(tmp_path / "test"), "--device", "cpu"]) == 0
    assert 0.0 <= json.loads((tmp_path / "test" / "metrics.json").read_text())["mIoU"] <= 1.0

    img = torch.randint(0, 256, (37, 53, 3), dtype=torch.uint8).numpy()  # odd size: padded inside
    import cv2

    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a.png"), img)
    assert main(["infer", str(run / "latest.pth"), str(tmp_path / "in"), "--out", str(tmp_path / "pred"),
                 "--device", "cpu"]) == 0
    assert (tmp_path / "pred" / "a_labelTrainIds.png").is_file()

    assert main(["bank", "build", str(run / "latest.pth"), "--data", str(root / "gta"), "--dataset", "gta",
                 "--size", "4", "--out", str(tmp_path / "bank"), "--device", "cpu", "--img-scale", "96", "54"]) == 0
    with np.load(tmp_path / "bank" / "f_buffer_s.npz") as f:
        assert f["arr_0"].shape == (4, 128)  # the preset's decoder channels
    capsys.readouterr()


def test_pretrained_hub_folder_feeds_the_student_and_the_frozen_feature_distance_model(dinov2_hub, fake_data,
                                                                                        tmp_path):
    """``model.pretrained`` = a Hub folder: the student starts from it, and with the feature distance on, the
    frozen model is the pretrained foundation model itself (its pyramid's last level is parameter-free)."""
    from dida.checkpoint import read_checkpoint
    from dida.engine.train import train
    from dida.models import foundation_weights as fw

    root = fake_data / "tiny_cpu"
    cfg = load_config("synth_dinov2s", [
        f"run.dir={tmp_path / 'run'}", f"data.source.root={root / 'gta'}", f"data.target.root={root / 'cs'}",
        f"data.val.root={root / 'cs'}", f"model.pretrained={dinov2_hub}", "model.vit.hidden_size=32",
        "model.vit.num_layers=4", "model.vit.num_heads=2", "model.vit.image_size=56", "model.decoder_channels=16",
        "uda.feature_distance.enabled=true", "uda.mic.enabled=false", "train.max_iters=1", "optim.warmup_iters=0",
        "train.checkpoint_interval=0", "train.eval_interval=0", "data.num_workers=0", "run.device=cpu",
        "data.source.img_scale=[128,72]", "data.source.crop_size=[64,64]", "data.target.img_scale=[128,64]",
        "data.target.crop_size=[64,64]", "data.val.img_scale=[128,64]"])
    hub, _ = fw.dinov2_weights_to_backbone(read_checkpoint(dinov2_hub))
    seen = {}
    train(cfg, on_end=lambda models: seen.update(models))
    frozen = seen["feature_distance"].imnet_model.backbone.state_dict()
    assert all(torch.equal(frozen[k], v) for k, v in hub.items())
    student = seen["model"].backbone.state_dict()
    unchanged = {k for k, v in hub.items() if torch.equal(student[k], v)}
    assert unchanged == {"vit.embeddings.mask_token"}  # one step from the Hub weights (the mask token has no grad)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(rows[-1]["loss/feat_dist"])

"""The configuration that goes with a checkpoint: what ``dida test``, ``dida infer``, ``dida bank build`` and
``dida.load_model`` use for the model and its data settings (test scale, evaluation mode, classes).

1. ``--config`` / ``config=`` given: that preset or YAML (its class count must match the weights).
2. Else the run's resolved configuration stored in the checkpoint (dida checkpoints, exported folders).
3. Else (mmcv checkpoints, bare weights): the model read from the weights, the data settings of the preset
   that matches its kind (``DEFAULT_PRESETS``), and the settings so assumed are listed for the user.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dida.config import Config, load_config, load_config_text
from dida.errors import CheckpointError, ConfigError

__all__ = ["DEFAULT_PRESETS", "ResolvedConfig", "config_for_checkpoint"]

# The preset whose data settings a checkpoint without a stored configuration gets, by segmentor kind.
DEFAULT_PRESETS: dict[str, str] = {"encoder_decoder": "gta2cs_daformer", "hrda": "gta2cs_hrda"}


@dataclass
class ResolvedConfig:
    """A configuration for a checkpoint and where it came from.

    Attributes:
        cfg: the configuration (``cfg.model`` builds the network; ``cfg.data.val`` and ``cfg.eval`` say how
            to run it); ``model.pretrained`` is cleared (the checkpoint holds the weights).
        source: a phrase for messages: "the checkpoint's configuration", "gta2cs_dida", ...
        assumed: the settings not stored with the weights, taken from a preset (empty when none).
    """

    cfg: Config
    source: str
    assumed: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line saying where the settings come from (and what was assumed)."""
        line = f"settings from {self.source}"
        if self.assumed:
            line += f"; assumed (not stored in the checkpoint): {'; '.join(self.assumed)}. Pass --config to change"
        return line


def _check_classes(cfg: Config, ckpt: Mapping[str, Any], where: str, label: str) -> None:
    from dida.checkpoint import model_cfg_from_checkpoint

    from_weights = model_cfg_from_checkpoint(ckpt)
    if from_weights is not None and from_weights.num_classes != cfg.model.num_classes:
        raise CheckpointError(
            f"{where}: the checkpoint predicts {from_weights.num_classes} classes but {label} says "
            f"model.num_classes={cfg.model.num_classes}. Use the configuration the checkpoint was trained with "
            f"(its run directory) or override model.num_classes={from_weights.num_classes}.")


def _assumed(cfg: Config) -> list[str]:
    v, e = cfg.data.val, cfg.eval
    items = [f"test scale {v.img_scale[0]}x{v.img_scale[1]} (data.val.img_scale)", f"{e.mode} inference (eval.mode)"]
    if e.mode == "slide":
        items.append(f"windows {e.crop_size[0]}x{e.crop_size[1]}, stride {e.stride[0]}x{e.stride[1]} (eval.*)")
    return items + _assumed_heads(cfg.model)


def _assumed_heads(m: Any) -> list[str]:
    """Attention head counts: no weight shape stores them, so they come from the named variant."""
    if m.backbone.startswith("mit_"):
        from dida.models.mit import MIT_VARIANTS

        heads = list(m.num_heads) if m.num_heads is not None else list(MIT_VARIANTS[m.backbone].num_heads)
        return [f"attention heads {heads} of {m.backbone} (model.num_heads; the weights do not store them)"]
    from dida.models.foundation import VIT_VARIANTS, resolve_variant

    if m.backbone in VIT_VARIANTS:
        heads = resolve_variant(m).num_heads
        return [f"{heads} attention heads of {m.backbone} (model.vit.num_heads; the weights do not store them)"]
    return []


def config_for_checkpoint(ckpt: Mapping[str, Any], *, where: str, config: str | None = None,
                          overrides: Sequence[str] = ()) -> ResolvedConfig:
    """The configuration for an already-read checkpoint (see the module docstring).

    Args:
        ckpt: the checkpoint dict (``dida.checkpoint.read_checkpoint``).
        where: the checkpoint's file or reference, for messages.
        config: a preset name, YAML path or run directory that overrides what the checkpoint says.
        overrides: dotted overrides applied last.

    Raises:
        CheckpointError: the class counts of the configuration and the weights differ, or nothing tells
            which model the checkpoint holds.
    """
    from dida.checkpoint import model_cfg_from_checkpoint

    if config is not None:
        resolved = ResolvedConfig(load_config(config, list(overrides)), str(config))
        _check_classes(resolved.cfg, ckpt, where, str(config))
    elif isinstance(ckpt.get("config"), str) and ckpt["config"].strip():
        try:
            cfg = load_config_text(ckpt["config"], f"{where} (stored configuration)", list(overrides))
        except ConfigError as e:
            message = str(e) if str(e).startswith(where) else f"{where} (stored configuration): {e}"
            raise ConfigError(f"{message.rstrip('.')}. Pass --config with the preset or YAML the checkpoint was "
                              "trained with.") from None
        resolved = ResolvedConfig(cfg, "the checkpoint's configuration")
    else:
        model_cfg = model_cfg_from_checkpoint(ckpt)
        if model_cfg is None:
            raise CheckpointError(
                f"{where}: cannot tell which model this checkpoint holds. Pass --config with the preset or YAML "
                "it was trained with.")
        from dida.config import preset_names

        preset = DEFAULT_PRESETS.get(model_cfg.segmentor)
        preset = preset if preset in preset_names() else None
        cfg = load_config(preset, list(overrides))
        cfg.model = model_cfg
        data_from = f"preset {preset}" if preset else "the defaults"
        resolved = ResolvedConfig(cfg, f"the weights (model) and {data_from} (data settings)", _assumed(cfg))
    resolved.cfg.model.pretrained = None
    return resolved

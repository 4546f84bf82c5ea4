"""The table of training terms: the one place that lists them.

Each entry names the configuration section that holds the term's settings (``uda.<section>``, a
dataclass with an ``enabled`` key) and the builder that turns the configuration into a ``Term``. The step
runs the enabled terms in table order. Built-in terms:

- ``feature_distance``: DAFormer's ImageNet feature distance on thing classes (``uda.feature_distance``);
- ``dual_level``: DIDA's instance bank and calibrated instance loss (``uda.dual_level``, ``uda.bank``).

A term defined outside the package is registered with ``register_term`` before the configuration is
loaded; its configuration dataclass then becomes the section ``uda.<name>`` (typed, validated, shown by
``dida train --help-config``). See ``docs/design.md`` for a complete example.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import TYPE_CHECKING

from dida.uda.terms.base import MixedBatch, PseudoLabels, StepContext, Term, TermBuildContext

if TYPE_CHECKING:
    from dida.config import Config

__all__ = [
    "TERMS", "MixedBatch", "PseudoLabels", "StepContext", "Term", "TermBuildContext", "TermSpec", "build_terms",
    "enabled_terms", "extra_sections", "register_term",
]


@dataclass(frozen=True)
class TermSpec:
    """One entry of ``TERMS``.

    Attributes:
        section: the name of its configuration section under ``uda``.
        build: ``build(cfg, ctx) -> Term``: translates the whole configuration into the term.
        config: the section's dataclass when it is not a field of ``dida.config.UDACfg`` (terms defined
            outside the package); it must have an ``enabled: bool`` field.
    """

    section: str
    build: Callable[[Config, TermBuildContext], Term]
    config: type | None = None


def _feature_distance(cfg: Config, ctx: TermBuildContext) -> Term:
    from dida.uda.terms.feature_distance import build

    return build(cfg, ctx)


def _dual_level(cfg: Config, ctx: TermBuildContext) -> Term:
    from dida.uda.terms.dual_level import build

    return build(cfg, ctx)


def _mic(cfg: Config, ctx: TermBuildContext) -> Term:
    from dida.uda.terms.mic import build

    return build(cfg, ctx)


TERMS: dict[str, TermSpec] = {
    "feature_distance": TermSpec("feature_distance", _feature_distance),
    "dual_level": TermSpec("dual_level", _dual_level),
    "mic": TermSpec("mic", _mic),
}


def register_term(name: str, build: Callable[[Config, TermBuildContext], Term], config: type) -> None:
    """Add a term defined outside the package; its settings become ``uda.<name>`` (a dataclass instance).

    Args:
        name: the term's name and configuration section (must not clash with another ``uda`` key).
        build: ``build(cfg, ctx) -> Term``; read the term's settings as ``getattr(cfg.uda, name)``.
        config: a dataclass with an ``enabled: bool`` field and a default for every field.
    """
    from dida.config import UDACfg

    if not is_dataclass(config) or "enabled" not in {f.name for f in fields(config)}:
        raise TypeError(f"register_term({name!r}): config must be a dataclass with an 'enabled' field")
    if name in {f.name for f in fields(UDACfg)} or (name in TERMS and TERMS[name].config is None):
        raise ValueError(f"register_term({name!r}): 'uda.{name}' is already a built-in section")
    TERMS[name] = TermSpec(name, build, config)


def extra_sections() -> dict[str, type]:
    """Configuration sections of registered terms that are not fields of ``UDACfg``."""
    return {spec.section: spec.config for spec in TERMS.values() if spec.config is not None}


def enabled_terms(cfg: Config) -> list[str]:
    """Names of the terms whose section says ``enabled: true``, in table order."""
    return [name for name, spec in TERMS.items() if bool(getattr(cfg.uda, spec.section).enabled)]


def build_terms(cfg: Config, ctx: TermBuildContext) -> dict[str, Term]:
    """The enabled terms, built and moved to ``ctx.device``, by name (table order).

    Raises:
        ConfigError: a term that needs the teacher while ``uda.self_training`` is off.
    """
    from dida.errors import ConfigError

    out: dict[str, Term] = {}
    for name in enabled_terms(cfg):
        term = TERMS[name].build(cfg, ctx)
        if term.needs_teacher and not cfg.uda.self_training:
            raise ConfigError(
                f"uda.{TERMS[name].section}.enabled: the {name} term needs the teacher's pseudo-labels; "
                "set uda.self_training=true or disable the term.")
        term.name = name
        out[name] = term.to(ctx.device)
    return out


"""Named presets: `register_model`, `create_model(name, **overrides)`, `list_models()`.

A preset is a function returning a config; overrides are applied by field
name, to the model config or (for sizes and sharing) to its encoder config.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..layers.moe import MOE_SETTINGS, MoEConfig
from ..settings import SettingTypeError, field_kinds
from .text import TextConfig


@dataclass(frozen=True)
class ModelEntry:
    name: str
    make_config: Callable[[], Any]
    build: Callable[[Any], nn.Module]
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, build: Callable[[Any], nn.Module], description: str = ""):
    """Decorator registering a config factory under `name`."""

    def wrap(make_config: Callable[[], Any]) -> Callable[[], Any]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(name, make_config, build, description or (make_config.__doc__ or "").strip())
        return make_config

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return _REGISTRY[name]


def require_preset_kind(name: str, kind: str, command: str, other: str | None = None) -> None:
    """ValueError unless preset `name` is a `kind` ("vision" or "text") model: one line naming what
    `command` takes and where the other kind goes (`other`, default the training commands)."""
    is_text = isinstance(get_entry(name).make_config(), TextConfig)
    if is_text == (kind == "text"):
        return
    other = other or ("widenet pretrain and widenet finetune train text models" if is_text else
                      "widenet train trains image models")
    example = "widenet_text_tiny" if kind == "text" else "widenet_tiny"
    raise ValueError(f"{name} is {'a text' if is_text else 'an image'} model; {command} takes "
                     f"{'text' if kind == 'text' else 'image'} models such as {example} ({other})")


def model_config(name: str, **overrides: Any) -> Any:
    """The preset's config with `overrides` applied (validated again)."""
    return apply_overrides(get_entry(name).make_config(), overrides)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered preset, e.g. create_model("widenet_b16", num_classes=1001)."""
    entry = get_entry(name)
    model = entry.build(apply_overrides(entry.make_config(), overrides))
    model.model_name = name
    return model


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Replace fields of cfg, cfg.encoder or cfg.encoder.moe by name; unknown names raise ValueError,
    and so do MoE settings for a model left without MoE layers (they would be silently ignored).

    `representation=True` is shorthand for representation_size = encoder width.
    """
    overrides = dict(overrides)
    if "encoder" in overrides:  # it would reach dataclasses.replace twice
        raise ValueError("give encoder settings one by one by name (e.g. dim=32, depth=4), not as encoder=...")
    representation = overrides.pop("representation", False)
    if not isinstance(representation, bool):  # strict, like every setting ("no" is truthy)
        raise SettingTypeError(f"representation must be True or False, got {representation!r}")
    if representation:
        overrides.setdefault("representation_size", cfg.encoder.dim)
    top = {f.name for f in dataclasses.fields(cfg)}
    inner = {f.name for f in dataclasses.fields(cfg.encoder)} | set(MOE_SETTINGS)
    unknown = sorted(set(overrides) - top - inner)
    if unknown:
        known = sorted((top | inner) - {"encoder", "moe"})  # less the nested configs themselves
        near = sorted({m for key in unknown for m in difflib.get_close_matches(key, known, n=2)})
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ValueError(f"unknown model setting(s): {', '.join(unknown)}{hint}; the settings of "
                         f"{type(cfg).__name__} are {', '.join(known)}")
    enc_changes = {k: v for k, v in overrides.items() if k in inner and k not in top}
    top_changes = {k: v for k, v in overrides.items() if k in top}
    new = dataclasses.replace(cfg, **top_changes, encoder=cfg.encoder.replace(**enc_changes))
    idle = [k for k in overrides if k in MOE_SETTINGS or k == "moe"]
    if idle and not new.encoder.moe_block_ids:
        raise ValueError(f"{', '.join(idle)}: the model has no MoE layer (moe_blocks={new.encoder.moe_blocks!r}), so "
                         "this would change nothing; give it MoE layers (moe_blocks=all, last:N or every:N), "
                         "choose an MoE model, or turn a trained dense model into one with widenet upcycle")
    return new


def settings_for(cfg: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` less its MoE settings where the model they give has no MoE layer: what each
    model gets from a driver that applies one set of settings to several (widenet compare)."""
    dense = {k: v for k, v in overrides.items() if k not in MOE_SETTINGS}
    return dict(overrides) if apply_overrides(cfg, dense).encoder.moe_block_ids else dense


def settings_for_each(names: list[str], overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """settings_for of every named preset; ValueError when `overrides` holds MoE settings that
    no model takes (they would change nothing: compare, compare-text and bench model)."""
    each = {name: settings_for(model_config(name), overrides) for name in names}
    moe = [k for k in overrides if k in MOE_SETTINGS]
    if moe and not any(set(moe) <= each[name].keys() for name in names):
        example = "widenet_text_tiny" if all(isinstance(model_config(n), TextConfig) for n in names) else "widenet_tiny"
        raise ValueError(f"{', '.join(moe)}: none of {', '.join(names)} has MoE layers, so this would change "
                         f"nothing; add an MoE model ({example}) or leave the MoE settings out")
    return each


def setting_kinds() -> dict[str, tuple[type, bool]]:
    """{name: (type, optional)} of every model setting an override may name (the model configs',
    the encoder's and the MoE's), as widenet.settings reads them from the annotations."""
    from .encoder import EncoderConfig
    from .text import TextConfig
    from .vision import VisionConfig

    kinds: dict[str, tuple[type, bool]] = {"representation": (bool, False)}
    for cls in (MoEConfig, EncoderConfig, TextConfig, VisionConfig):
        kinds.update(field_kinds(cls))
    return kinds


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters; a shared (or tied) tensor is counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

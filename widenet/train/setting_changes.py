"""What differs between a checkpoint's settings and those of the run that would resume it, named
setting by setting (a resume with other settings is refused: trainer.Trainer); and the data records
a checkpoint from before they were kept lacks."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..layers.moe import MOE_SETTINGS
from ..models.encoder import moe_block_ids
from .config import RecipeConfig

__all__ = ["changed_settings", "unrecorded"]


def changed_settings(cfg: RecipeConfig, meta: dict[str, Any], saved_meta: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(the run settings of cfg that conflict with the checkpoint's, every change as "name: old -> new").

    meta and saved_meta: the run's and the checkpoint's meta (model name, model_config,
    train_config). A model's settings are compared one by one (num_experts, not the whole --set
    dictionary); MoE settings are left out where neither model has an MoE layer.
    """
    saved = saved_meta.get("train_config", {})
    folder = saved_meta.get("folder")  # the run folder it was saved in (absolute)
    conflicts = cfg.resume_conflicts(saved, folder if isinstance(folder, str) and os.path.isabs(folder) else None)
    saved_model, model = saved_meta.get("model_config"), meta.get("model_config")
    model_changes = []
    if isinstance(saved_model, dict) and isinstance(model, dict) and saved_meta.get("model") == cfg.model:
        if _without_moe_layers(saved_model) and _without_moe_layers(model):  # MoE settings do nothing there
            saved_model, model = _moe_settings_dropped(saved_model), _moe_settings_dropped(model)
            if "model_overrides" in conflicts and _moe_settings_dropped(saved.get("model_overrides") or {}) == \
                    _moe_settings_dropped(cfg.model_overrides):
                conflicts.remove("model_overrides")  # a run from before they were refused on such a model
        model_changes = [f"{k}: {a!r} -> {b!r}" for k, a, b in _changed_entries(saved_model, model)]
    if model_changes:  # named one by one: not also as the whole --set dictionary
        conflicts = [k for k in conflicts if k != "model_overrides"]
    return conflicts, [f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in conflicts] + model_changes


def _without_moe_layers(model_config: dict[str, Any]) -> bool:
    """A saved model config (dict) whose encoder has no MoE block."""
    encoder = model_config.get("encoder")
    if not isinstance(encoder, dict) or not isinstance(encoder.get("moe_blocks"), str):
        return False
    try:
        return not moe_block_ids(encoder["moe_blocks"], int(encoder.get("depth", 0)))
    except ValueError:
        return False


def _moe_settings_dropped(config: dict[str, Any]) -> dict[str, Any]:
    """A model config (or a dict of model settings) without its MoE settings."""
    out = {k: v for k, v in config.items() if k not in MOE_SETTINGS and k != "moe"}
    if isinstance(out.get("encoder"), dict):
        out["encoder"] = _moe_settings_dropped(out["encoder"])
    return out


def _changed_entries(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(name, saved value, new value) of every setting that differs, nested dicts flattened
    (a model's encoder settings are named by their own names: num_experts, not encoder.num_experts)."""
    out = []
    for key in sorted(saved.keys() & now.keys()):  # a key only one side has: a newer widenet's default
        a, b = saved[key], now[key]
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_entries(a, b)
        elif a != b:
            out.append((key, a, b))
    return out


def unrecorded(meta: dict[str, Any], saved_meta: Mapping[str, Any], records: Mapping[str, Any],
               within: str = "") -> tuple[dict[str, Any], list[str]]:
    """The run's meta without those of its `records` (e.g. {"data": {"validation_contents": ...}}) that
    the checkpoint's saved_meta lacks (written before widenet kept them: a resume cannot compare them,
    checkpoint.load_checkpoint), and their dotted names ("data.validation_contents"). A resumed run does
    not start keeping them: the file it reads now would be recorded as the one it began with."""
    out, left_out = dict(meta), []
    for key, want in records.items():
        if key not in saved_meta:
            if within or isinstance(want, Mapping):
                out.pop(key, None)
                left_out.append(within + key)
        elif isinstance(want, Mapping) and isinstance(saved_meta[key], Mapping) and isinstance(out.get(key), dict):
            out[key], inner = unrecorded(out[key], saved_meta[key], want, f"{within}{key}.")
            left_out += inner
    return out, left_out

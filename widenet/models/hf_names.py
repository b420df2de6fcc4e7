"""Hugging Face's names for widenet's tensors, for the import (hf.py) and the export (hf_export.py).

A mapping takes a widenet state-dict key, or a prefix ending in "." that maps every "prefix.weight"
and "prefix.bias", to the Hugging Face name without the base model's prefix ("albert.", "bert.",
"vit."); a list of names stands for rows concatenated in widenet (q, k and v in one qkv).
"""

from __future__ import annotations

from typing import Any

__all__ = ["albert_names", "bert_names", "resolve", "vit_names"]


def albert_names(groups: int = 1) -> dict[str, str | list[str]]:
    """widenet key -> HF name for ALBERT: groups=1, one layer shared by all blocks (widenet's ALBERT
    sharing); groups=depth, a layer group per block (nothing shared: a BERT with ALBERT's factorized
    embedding)."""
    keys: dict[str, str | list[str]] = {**_embedding_names(),
                                        "backbone.embeddings.project.": "encoder.embedding_hidden_mapping_in."}
    for i in range(groups):
        keys.update(_block_names("backbone.encoder.", i, f"encoder.albert_layer_groups.{i}.albert_layers.0.", dict(
            qkv=[f"attention.{p}." for p in ("query", "key", "value")], proj="attention.dense.",
            attn_norm="attention.LayerNorm.", fc1="ffn.", fc2="ffn_output.", ffn_norm="full_layer_layer_norm.")))
    keys.update({
        "backbone.pooler.": "pooler.",
        "mlm_head.dense.": "predictions.dense.",
        "mlm_head.norm.": "predictions.LayerNorm.",
        "mlm_head.bias": "predictions.bias",
        "sop_head.proj.": "sop_classifier.classifier.",
    })
    return {**keys, **_task_head_names()}


def bert_names(depth: int) -> dict[str, str | list[str]]:
    """widenet key -> HF name for BERT (its embedding has no projection: the import gives ours as the
    identity, "__identity__.")."""
    keys: dict[str, str | list[str]] = {**_embedding_names(), "backbone.embeddings.project.": "__identity__."}
    for i in range(depth):
        keys.update(_block_names("backbone.encoder.", i, f"encoder.layer.{i}.", dict(
            qkv=[f"attention.self.{p}." for p in ("query", "key", "value")], proj="attention.output.dense.",
            attn_norm="attention.output.LayerNorm.", fc1="intermediate.dense.", fc2="output.dense.",
            ffn_norm="output.LayerNorm.")))
    keys.update({"backbone.pooler.": "pooler.dense.", "mlm_head.dense.": "cls.predictions.transform.dense.",
                 "mlm_head.norm.": "cls.predictions.transform.LayerNorm.", "mlm_head.bias": "cls.predictions.bias",
                 "sop_head.proj.": "cls.seq_relationship."})
    return {**keys, **_task_head_names()}


def _block_names(ours: str, i: int, hf: str, names: dict[str, Any]) -> dict[str, str | list[str]]:
    """Block i of widenet's encoder (under `ours`) -> the HF layer's names under `hf`: names holds the
    HF suffixes of qkv (a list: q, k, v), proj, attn_norm, fc1, fc2, ffn_norm."""
    return {f"{ours}attention.{i}.qkv.": [hf + q for q in names["qkv"]],
            f"{ours}attention.{i}.proj.": hf + names["proj"],
            f"{ours}norms.{i}.attn_norm.": hf + names["attn_norm"],
            f"{ours}norms.{i}.ffn_norm.": hf + names["ffn_norm"],
            f"{ours}mlps.{i}.fc1.": hf + names["fc1"], f"{ours}mlps.{i}.fc2.": hf + names["fc2"]}


def _embedding_names() -> dict[str, str]:
    return {"backbone.embeddings.word.": "embeddings.word_embeddings.",
            "backbone.embeddings.position.": "embeddings.position_embeddings.",
            "backbone.embeddings.token_type.": "embeddings.token_type_embeddings.",
            "backbone.embeddings.norm.": "embeddings.LayerNorm."}


def _task_head_names() -> dict[str, str]:
    return {"classifier.proj.": "classifier.", "span_head.proj.": "qa_outputs."}


def vit_names(depth: int, legacy: bool) -> dict[str, str | list[str]]:
    """widenet key -> HF name for ViT; legacy: transformers 4's names (encoder.layer.N.attention.attention.query),
    else transformers 5's (layers.N.attention.q_proj)."""
    keys: dict[str, str | list[str]] = {
        "cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.": "embeddings.patch_embeddings.projection.",
        "encoder.final_norm.": "layernorm.", "pre_logits.0.": "pooler.dense.", "head.": "classifier.",
    }
    norms = dict(attn_norm="layernorm_before.", ffn_norm="layernorm_after.")
    for i in range(depth):
        if legacy:
            names = dict(qkv=[f"attention.attention.{p}." for p in ("query", "key", "value")],
                         proj="attention.output.dense.", fc1="intermediate.dense.", fc2="output.dense.", **norms)
        else:
            names = dict(qkv=[f"attention.{p}_proj." for p in "qkv"], proj="attention.o_proj.", fc1="mlp.fc1.",
                         fc2="mlp.fc2.", **norms)
        keys.update(_block_names("encoder.", i, f"encoder.layer.{i}." if legacy else f"layers.{i}.", names))
    return keys


def resolve(key: str, mapping: dict[str, str | list[str]]) -> str | list[str] | None:
    """The HF name(s) of widenet tensor `key` through a mapping of full names or prefixes."""
    if key in mapping:
        return mapping[key]
    head, dot, leaf = key.rpartition(".")
    if dot and head + "." in mapping:
        source = mapping[head + "."]
        return source + leaf if isinstance(source, str) else [s + leaf for s in source]
    return None

"""The paper's text models (ALBERT-style, Table 3) and tiny variants for this CPU.

Paper sizes: vocabulary 30000, embedding 128, hidden 768, 12 blocks, 12
heads, FFN / expert width 3072, 512 positions, post-LayerNorm as BERT/ALBERT.
Trainable parameters of the task="pretrain" model, counted as by
`count_parameters`: the backbone (embeddings + projection, encoder, pooler)
plus the masked-LM head (its decoder is the tied word embedding, counted once;
its own dense, LayerNorm and output bias are counted) and the sentence-order
head (768 x 2 + 2):

    albert_base       11,813,810   (paper 12M)  attention, FFN, norms shared
    bert_factorized   89,780,402   (paper 89M)  nothing shared
    widenet_text_4e   26,017,970   (paper 26M)  shared attention + 4-expert MoE, own norms
    widenet_text_8e   44,910,770   (paper 45M)  ... 8 experts
    widenet_text_16e  82,696,370   (paper 83M)  ... 16 experts

Tiny presets for a 2-core CPU (vocabulary 8000, embedding 64, width 128, 4
blocks, 4 heads, FFN / experts 256, 4 experts top-2, 128 positions), counted
the same way at vocabulary 8000 (with the final LayerNorm of their pre-norm layout):

    albert_text_tiny     694,658
    bert_text_tiny     1,092,098
    widenet_text_tiny    894,466

They are PRE-norm, unlike the paper's models, because CPU budgets are short
and post-norm trains much more slowly at this size: on MLM over random
sequences of a repeated 4-token pattern (20 token ids, batch 16 x 64, AdamW
lr 1e-3) the masked-token loss after 300 steps was albert 0.14 post-norm vs
0.09 pre-norm, widenet 0.51 vs 0.15, bert 2.10 vs 0.07 (30 warmup steps
only brought bert's post-norm to 1.81). All three tiny presets use the same
norm position, so the comparison stays fair; --set norm_position=post gives
the paper's layout.
"""

from __future__ import annotations

from .encoder import EncoderConfig
from .presets import ALBERT_SHARING, WIDENET_SHARING
from .registry import register_model
from .text import TextConfig, TextTransformer

def _paper(**encoder) -> TextConfig:
    sizes = dict(dim=768, depth=12, num_heads=12, mlp_dim=3072, norm_position="post")
    return TextConfig(vocab_size=30000, embedding_size=128, max_positions=512, task="pretrain",
                      encoder=EncoderConfig.from_dict({**sizes, **encoder}))


def _tiny(**encoder) -> TextConfig:
    """A 2-core-CPU size; the pretrain command overrides vocab_size with its tokenizer's."""
    sizes = dict(dim=128, depth=4, num_heads=4, mlp_dim=256, norm_position="pre")
    return TextConfig(vocab_size=8000, embedding_size=64, max_positions=128, task="pretrain",
                      encoder=EncoderConfig.from_dict({**sizes, **encoder}))


def _text(name: str, doc: str):
    return register_model(name, TextTransformer, doc)


# --- the paper's models -------------------------------------------------------
@_text("albert_base", "ALBERT-base: 768 wide, 12 blocks, attention/FFN/norms shared, embedding 128")
def albert_base() -> TextConfig:
    return _paper(**ALBERT_SHARING)


@_text("bert_factorized", "BERT-base with ALBERT's factorized embedding (128), nothing shared")
def bert_factorized() -> TextConfig:
    return _paper()


@_text("widenet_text_4e", "WideNet text (ALBERT-base sizes): one attention, one 4-expert MoE, own norms")
def widenet_text_4e() -> TextConfig:
    return _paper(**WIDENET_SHARING, num_experts=4)


@_text("widenet_text_8e", "WideNet text (ALBERT-base sizes): one attention, one 8-expert MoE, own norms")
def widenet_text_8e() -> TextConfig:
    return _paper(**WIDENET_SHARING, num_experts=8)


@_text("widenet_text_16e", "WideNet text (ALBERT-base sizes): one attention, one 16-expert MoE, own norms")
def widenet_text_16e() -> TextConfig:
    return _paper(**WIDENET_SHARING, num_experts=16)


# --- tiny models for this CPU -----------------------------------------------------
@_text("albert_text_tiny", "tiny ALBERT text model: 128 wide, 4 blocks, everything shared, embedding 64")
def albert_text_tiny() -> TextConfig:
    return _tiny(**ALBERT_SHARING)


@_text("bert_text_tiny", "tiny BERT text model (embedding 64 -> 128 wide), 4 blocks, nothing shared")
def bert_text_tiny() -> TextConfig:
    return _tiny()


@_text("widenet_text_tiny", "tiny WideNet text model: one attention, one 4-expert MoE (256), own norms")
def widenet_text_tiny() -> TextConfig:
    return _tiny(**WIDENET_SHARING)

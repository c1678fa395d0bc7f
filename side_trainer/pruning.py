"""Structural pruning init: side block j starts as backbone block i with rows and columns removed.

Dims are ranked by importance (`backbone_worker.importance`: L1 norm of each row / column of the
Fisher or magnitude scores) and kept one-shot:
- residual dims: one set for the whole side network, ranked by the summed importance of every kept
  block's residual rows and columns (the reference re-chooses them per sub-layer, which makes
  consecutive blocks disagree on what a residual dim means; one set keeps them consistent);
- attention inner dims: per head, by the product of the Q, K and V row importances (a log-sum, so
  tiny Fisher values do not underflow); O's columns follow;
- Llama: one within-head set in rotary pairs, shared by every head, so rotary embeddings and
  grouped K/V heads stay valid; the side rotary embedding takes those pairs' frequencies;
- FFN inner dims by the product of the input projections' row importances; the output columns follow.

The trainer never loads the backbone: it reads only the tensors of the kept blocks, one at a time,
from the backbone's safetensors files, and keeps only the selected rows and columns.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from backbone_worker.families import DECODER, family_by_name
from side_trainer.model import SideNetwork

log = logging.getLogger(__name__)

INITS = ("fisher", "magnitude", "random")
_EPS = 1e-30


class CheckpointReader:
    """Lazy access to tensors of a safetensors checkpoint (one or several shards)."""

    def __init__(self, model_dir: Path):
        self.files = sorted(Path(model_dir).glob("*.safetensors"))
        if not self.files:
            raise FileNotFoundError(
                f"no *.safetensors in {model_dir}: the pruning init reads the backbone's weights; "
                f"train with --init random, or make the backbone directory available")
        self.where: dict[str, Path] = {}
        for file in self.files:
            with safe_open(file, "pt") as handle:
                for key in handle.keys():
                    self.where[key] = file

    def find(self, suffix: str) -> str | None:
        """The checkpoint key equal to `suffix` or ending in ".<suffix>" (prefixes such as
        "model." or "bert." differ between checkpoints)."""
        for key in self.where:
            if key == suffix or key.endswith("." + suffix):
                return key
        return None

    def get(self, key: str) -> torch.Tensor:
        with safe_open(self.where[key], "pt") as handle:
            return handle.get_tensor(key).float()


def _score(scores: dict[str, torch.Tensor], method: str, stream: str, i: int, name: str,
           axis: str) -> torch.Tensor | None:
    return scores.get(f"{method}/{stream}/{i}/{name}/{axis}")


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(values, k).indices).values


def choose_dims(net: SideNetwork, scores: dict[str, torch.Tensor], method: str) -> dict:
    """Kept dims: {"resid": idx} and {(stream, i, kind): idx} for each block's inner kinds."""
    family = family_by_name(net.cfg.family)
    backbone_config = net.cfg.hf_backbone_config()
    side = net.side_config
    r = net.cfg.reduction
    width = family.hidden_size(backbone_config)
    resid = torch.zeros(width)
    chosen: dict = {}
    within = 0  # Llama: within-head scores summed over every kept block
    for stream, stack in net.streams.items():
        for i, block in zip(stack.layers, stack.blocks):
            logs: dict[str, torch.Tensor] = defaultdict(lambda: 0)
            for name, param in block.named_parameters():
                kinds = family.axes(name)
                row = _score(scores, method, stream, i, name, "row")
                col = _score(scores, method, stream, i, name, "col")
                if row is None:
                    continue
                if kinds[0] == "resid":
                    resid += row
                if len(kinds) > 1 and kinds[1] == "resid" and col is not None:
                    resid += col
                if param.dim() == 2 and kinds[0] not in (None, "resid"):
                    logs[kinds[0]] = logs[kinds[0]] + torch.log(row + _EPS)
            if family.name == DECODER:
                within = within + _within_head(logs, backbone_config, side.head_dim * r)
            else:
                chosen.update(_head_dims(stream, i, logs, side, r))
            chosen[(stream, i, "ffn")] = _top(logs["ffn"], logs["ffn"].numel() // r)
    chosen["resid"] = _top(resid, width // r)
    if family.name == DECODER:
        # One rotary pair set for all blocks: they share one side rotary embedding.
        half = side.head_dim * r // 2
        pairs = _top(within[:half] + within[half:], side.head_dim // 2)
        keep = torch.cat([pairs, pairs + half])
        chosen["rotary_pairs"] = pairs
        heads, kv_heads = backbone_config.num_attention_heads, backbone_config.num_key_value_heads
        for stream, stack in net.streams.items():
            for i in stack.layers:
                chosen[(stream, i, "q")] = (torch.arange(heads)[:, None] * 2 * half + keep).flatten()
                chosen[(stream, i, "kv")] = (torch.arange(kv_heads)[:, None] * 2 * half + keep).flatten()
    return chosen


def _within_head(logs: dict, backbone_config, head_dim: int) -> torch.Tensor:
    """Llama: one score per within-head dim, summed over all query and key/value heads."""
    heads, kv_heads = backbone_config.num_attention_heads, backbone_config.num_key_value_heads
    return logs["q"].view(heads, head_dim).sum(0) + logs["kv"].view(kv_heads, head_dim).sum(0)


def _head_dims(stream: str, i: int, logs: dict, side, r: int) -> dict:
    """Per head: keep head_dim/r dims, so side head h is a subset of backbone head h."""
    heads = side.num_heads if hasattr(side, "num_heads") else side.num_attention_heads
    out = {}
    for kind in ("attn", "xattn"):
        if kind in logs:
            per_head = logs[kind].view(heads, -1)                      # (H, head_dim)
            keep = torch.topk(per_head, per_head.shape[1] // r, dim=1).indices.sort(dim=1).values
            out[(stream, i, kind)] = (torch.arange(heads)[:, None] * per_head.shape[1] + keep).flatten()
    return out


def pruned_block_state(net: SideNetwork, reader: CheckpointReader, chosen: dict, stream: str,
                       i: int, j: int) -> dict[str, torch.Tensor]:
    """The state dict of side block j, sliced from backbone block i."""
    family = family_by_name(net.cfg.family)
    block = net.streams[stream].blocks[j]
    prefix = family.block_prefix[stream]
    state = {}
    for name, param in block.state_dict().items():
        key = reader.find(prefix.format(i=i) + name)
        if key is None and "relative_attention_bias" in name:
            key = reader.find(prefix.format(i=0) + name)   # T5 keeps the bias in block 0 only
        if key is None:
            raise KeyError(f"backbone checkpoint has no tensor for side parameter "
                           f"{prefix.format(i=i) + name}")
        tensor = reader.get(key)
        for axis, kind in enumerate(family.axes(name)):
            if kind is not None:
                index = chosen["resid"] if kind == "resid" else chosen[(stream, i, kind)]
                tensor = tensor.index_select(axis, index)
        if tensor.shape != param.shape:
            raise ValueError(f"pruned {key} has shape {tuple(tensor.shape)}, side block expects "
                             f"{tuple(param.shape)}")
        state[name] = tensor
    return state


def apply_pruning_init(net: SideNetwork, model_dir: Path, scores: dict[str, torch.Tensor],
                       method: str) -> dict:
    """Initialise every side block from its pruned backbone block; returns the chosen dims."""
    if method not in ("fisher", "magnitude"):
        raise ValueError(f"unknown pruning init {method!r}; use one of {INITS}")
    reader = CheckpointReader(model_dir)
    chosen = choose_dims(net, scores, method)
    for stream, stack in net.streams.items():
        for j, i in enumerate(stack.layers):
            stack.blocks[j].load_state_dict(pruned_block_state(net, reader, chosen, stream, i, j))
        if hasattr(stack, "rotary"):
            stack.rotary.inv_freq.copy_(_backbone_inv_freq(net)[chosen["rotary_pairs"]])
    log.info("side network initialised from %s-pruned backbone blocks %s", method, net.cfg.layers)
    return chosen


def _backbone_inv_freq(net: SideNetwork) -> torch.Tensor:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    return LlamaRotaryEmbedding(net.cfg.hf_backbone_config()).inv_freq


def load_lm_head(net: SideNetwork, model_dir: Path) -> None:
    """T5: copy the frozen LM head (the tied shared embedding when tied) into the side network."""
    reader = CheckpointReader(model_dir)
    tied = getattr(net.cfg.hf_backbone_config(), "tie_word_embeddings", True)
    key = (reader.find("shared.weight") if tied else None) or reader.find("lm_head.weight")
    if key is None:
        raise KeyError(f"no LM head in {model_dir}")
    net.lm_head.copy_(reader.get(key))


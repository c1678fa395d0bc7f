"""Structural pruning init: side block j starts as backbone block i with rows and columns removed.

Dims are ranked by importance (`backbone_worker.importance`: L1 norm of each row / column of the
Fisher or magnitude scores) and kept one-shot:
- residual dims: one set for the whole side network, ranked by the summed importance of every kept
  block's residual rows and columns (the reference re-chooses them per sub-layer, which makes
  consecutive blocks disagree on what a residual dim means; one set keeps them consistent);
- attention inner dims: per head, by the product of the Q, K and V row importances (a log-sum, so
  tiny Fisher values do not underflow); O's columns follow. Encoder side networks with fewer
  heads than the backbone take the backbone heads whose best dims score highest;
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

from backbone_worker.families import (
    DECODER,
    ENCODER_DECODER,
    ROLE_MAPS,
    T5_BLOCK_PREFIX,
    Dims,
    Role,
    dims,
    family_by_name,
    role_map,
    rows_of,
)
from side_trainer.model import SideNetwork

log = logging.getLogger(__name__)

_EPS = 1e-30


class CheckpointReader:
    """Lazy access to tensors of a safetensors checkpoint (one or several shards)."""

    def __init__(self, model_dir: Path):
        self.files = sorted(Path(model_dir).glob("*.safetensors"))
        if not self.files:
            raise FileNotFoundError(
                f"no *.safetensors in {model_dir}: the pruning init reads the backbone's weights; "
                f"train with --init random, or make the backbone directory available"
            )
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


def side_scores(net: SideNetwork, scores: dict[str, torch.Tensor], method: str) -> dict:
    """Importance scores, keyed by the backbone's own parameter names, as the side blocks name
    them: {(stream, i, side name, "row" | "col"): tensor}. A fused weight's row scores are
    split by the role map's rows; its column scores count once (for the first role reading it),
    which keeps the residual stream's summed scores exact."""
    roles = role_map_of(net)
    d = dims(net.cfg.hf_backbone_config())
    out = {}
    for stream, stack in net.streams.items():
        for i, block in zip(stack.layers, stack.blocks):
            columns_counted = set()
            for name, _ in block.named_parameters():
                role = roles[name] if roles is not None else Role(name)
                row = scores.get(f"{method}/{stream}/{i}/{role.source}/row") if role else None
                if row is None:
                    continue
                if role.rows is not None:
                    row = row.index_select(0, rows_of(role.rows, d, row.shape[0]))
                out[stream, i, name, "row"] = row
                col = scores.get(f"{method}/{stream}/{i}/{role.source}/col")
                if col is not None and role.source not in columns_counted:
                    columns_counted.add(role.source)
                    out[stream, i, name, "col"] = col
    return out


def role_map_of(net: SideNetwork) -> dict[str, Role] | None:
    """Side parameter -> backbone role; None for T5, whose side blocks are its own block class
    (every name is the backbone's). Parameters a map leaves out keep their random init."""
    if net.cfg.family == ENCODER_DECODER:
        return None
    model_type = net.cfg.backbone_config["model_type"]
    roles = role_map(model_type)
    if roles is None:
        return None
    block = next(iter(net.streams.values())).blocks[0]
    return {name: roles.get(name) for name, _ in block.named_parameters()}


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(values, k).indices).values


def choose_dims(net: SideNetwork, scores: dict[str, torch.Tensor], method: str) -> dict:
    """Kept dims: {"resid": idx} and {(stream, i, kind): idx} for each block's inner kinds."""
    family = family_by_name(net.cfg.family)
    d = dims(net.cfg.hf_backbone_config())
    side = net.side_config
    r = net.cfg.reduction
    width = d.hidden
    resid = torch.zeros(width)
    chosen: dict = {}
    within = 0  # Llama: within-head scores summed over every kept block
    named = side_scores(net, scores, method)
    for stream, stack in net.streams.items():
        for i, block in zip(stack.layers, stack.blocks):
            logs: dict[str, torch.Tensor] = defaultdict(lambda: 0)
            for name, param in block.named_parameters():
                kinds = family.axes(name)
                row = named.get((stream, i, name, "row"))
                col = named.get((stream, i, name, "col"))
                if row is None:
                    continue
                if kinds[0] == "resid":
                    resid += row
                if len(kinds) > 1 and kinds[1] == "resid" and col is not None:
                    resid += col
                if param.dim() == 2 and kinds[0] not in (None, "resid"):
                    logs[kinds[0]] = logs[kinds[0]] + torch.log(row + _EPS)
            if family.name == DECODER:
                within = within + _within_head(logs, d, side.head_dim * r)
            else:
                side_heads = (
                    side.num_heads if hasattr(side, "num_heads") else side.num_attention_heads
                )
                chosen.update(_head_dims(stream, i, logs, d.heads, side_heads, r))
            ffn = logs["ffn"] if torch.is_tensor(logs["ffn"]) else torch.zeros(d.intermediate)
            chosen[(stream, i, "ffn")] = _top(ffn, ffn.numel() // r)
    chosen["resid"] = _top(resid, width // r)
    if family.name == DECODER:
        # One rotary pair set for all blocks: they share one side rotary embedding.
        half = side.head_dim * r // 2
        pairs = _top(within[:half] + within[half:], side.head_dim // 2)
        keep = torch.cat([pairs, pairs + half])
        chosen["rotary_pairs"] = pairs
        for stream, stack in net.streams.items():
            for i in stack.layers:
                chosen[(stream, i, "q")] = (
                    torch.arange(d.heads)[:, None] * 2 * half + keep
                ).flatten()
                chosen[(stream, i, "kv")] = (
                    torch.arange(d.kv_heads)[:, None] * 2 * half + keep
                ).flatten()
    return chosen


def _within_head(logs: dict, d: Dims, head_dim: int) -> torch.Tensor:
    """Llama: one score per within-head dim, summed over all query and key/value heads."""
    return logs["q"].view(d.heads, head_dim).sum(0) + logs["kv"].view(d.kv_heads, head_dim).sum(0)


def _head_dims(stream: str, i: int, logs: dict, heads: int, side_heads: int, r: int) -> dict:
    """Attention inner dims, each side head a subset of one backbone head (a head's queries and
    keys must keep the same dims). The side keeps 1/r of the backbone's inner width: with the
    backbone's count of heads, head h keeps 1/r of backbone head h's dims; with fewer (wider)
    side heads, they come from the backbone heads whose best dims score highest, in order."""
    out = {}
    for kind in ("attn", "xattn"):
        if kind in logs:
            per_head = logs[kind].view(heads, -1)  # (H, head_dim) log-importances
            width = per_head.numel() // r // side_heads  # a side head's dims
            best = torch.topk(per_head, width, dim=1)
            kept = torch.topk(best.values.sum(1), side_heads).indices.sort().values
            keep = best.indices[kept].sort(dim=1).values
            out[(stream, i, kind)] = (kept[:, None] * per_head.shape[1] + keep).flatten()
    return out


def pruned_block_state(
    net: SideNetwork, reader: CheckpointReader, chosen: dict, stream: str, i: int, j: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict of side block j, sliced from backbone block i (each side parameter from
    the backbone weight that plays its role), and the side parameters no backbone weight maps
    to (they keep their init; a missing bias is zero, as the backbone has none)."""
    family = family_by_name(net.cfg.family)
    block = net.streams[stream].blocks[j]
    roles = role_map_of(net)
    d = dims(net.cfg.hf_backbone_config())
    state, unmapped = {}, []
    for name, param in block.state_dict().items():
        if roles is None:  # T5: its own block class
            key = reader.find(T5_BLOCK_PREFIX[stream].format(i=i) + name)
            if key is None and "relative_attention_bias" in name:  # T5 keeps it in block 0
                key = reader.find(T5_BLOCK_PREFIX[stream].format(i=0) + name)
            role = Role(name)
        else:
            role = roles[name]
            key = reader.find(f"{i}.{role.source}") if role is not None else None
        if key is None:
            if roles is None:
                raise KeyError(
                    f"backbone checkpoint has no tensor for side parameter "
                    f"{T5_BLOCK_PREFIX[stream].format(i=i) + name}"
                )
            unmapped.append(name)
            if name.endswith("bias"):
                state[name] = torch.zeros_like(param)
            continue
        tensor = role.select(reader.get(key), d)
        for axis, kind in enumerate(family.axes(name)):
            if kind is not None:
                index = chosen["resid"] if kind == "resid" else chosen[(stream, i, kind)]
                tensor = tensor.index_select(axis, index)
        if tensor.shape != param.shape:
            raise ValueError(
                f"pruned {key} has shape {tuple(tensor.shape)}, side block expects "
                f"{tuple(param.shape)}"
            )
        state[name] = tensor
    return state, unmapped


def apply_pruning_init(
    net: SideNetwork, model_dir: Path, scores: dict[str, torch.Tensor], method: str
) -> dict | None:
    """Initialise every side block from its pruned backbone block; returns the chosen dims, or
    None when no role map says which backbone weight is which (the blocks stay random)."""
    if method not in ("fisher", "magnitude"):
        raise ValueError(f"pruning init {method!r} is not fisher or magnitude")
    model_type = net.cfg.backbone_config["model_type"]
    if net.cfg.family != ENCODER_DECODER and role_map(model_type) is None:
        log.warning(
            "no role map for model type %r (known: %s): the side blocks keep a random "
            "init instead of the %s-pruned backbone blocks",
            model_type,
            ", ".join(sorted(ROLE_MAPS)),
            method,
        )
        return None
    reader = CheckpointReader(model_dir)
    chosen = choose_dims(net, scores, method)
    unmapped: set[str] = set()
    for stream, stack in net.streams.items():
        for j, i in enumerate(stack.layers):
            state, missing = pruned_block_state(net, reader, chosen, stream, i, j)
            stack.blocks[j].load_state_dict(state, strict=False)
            unmapped.update(missing)
        if hasattr(stack, "rotary"):
            stack.rotary.inv_freq.copy_(_backbone_inv_freq(net)[chosen["rotary_pairs"]])
    if unmapped:
        log.info(
            "side block parameters with no backbone counterpart keep their init: %s",
            ", ".join(sorted(unmapped)),
        )
    log.info("side network initialised from %s-pruned backbone blocks %s", method, net.cfg.layers)
    return chosen


def _backbone_inv_freq(net: SideNetwork) -> torch.Tensor:
    """The rotary frequencies of a full-width head (the side head keeps some of its pairs)."""
    d = dims(net.cfg.hf_backbone_config())
    return 1.0 / d.rope_theta ** (torch.arange(0, d.head_dim, 2, dtype=torch.float) / d.head_dim)


def load_lm_head(net: SideNetwork, model_dir: Path) -> None:
    """T5: copy the frozen LM head (the tied shared embedding when tied) into the side network."""
    reader = CheckpointReader(model_dir)
    tied = getattr(net.cfg.hf_backbone_config(), "tie_word_embeddings", True)
    key = (reader.find("shared.weight") if tied else None) or reader.find("lm_head.weight")
    if key is None:
        raise KeyError(f"no LM head in {model_dir}")
    net.lm_head.copy_(reader.get(key))

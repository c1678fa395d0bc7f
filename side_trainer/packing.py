"""Encoder side networks run on the batch's real tokens only (packed), not on its padding.

A batch of texts is padded to its longest: the bench's batch of 32 tweets holds 960 real tokens in
32 x 48 positions, so 37.5% of every per-token product (ladders, projections, feed-forward, layer
norms) would be spent on padding. Packed, each stream's states are (N, C) for its N real tokens,
and only attention sees the padded (B, T) layout: the block's query, key and value go to it
together, its output comes back packed.

Measured on 2 CPU cores (MiniLM side networks reading live states, batch 32): 5.3-5.5 ms a
network packed against 7.3-7.9 ms padded. The outputs are the padded path's, up to float rounding
(tests/test_side_network.py checks them against transformers' own BertLayer, with gradients).

Packing costs its gathers and scatters, so it runs only where there is padding to skip
(MIN_PADDING). Training batches rarely qualify: the store's reader sorts examples by length
before it cuts batches (6% padding in the quick bench's), and there the packed training step
was slower (0.60 s against 0.55 s an epoch). Requests to the service arrive in any lengths.

Only encoder side networks pack: their blocks are BertLayer, whose forward `bert_block` repeats
on packed tokens. T5 and decoder-only side blocks (relative position bias, rotary positions)
still run padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from backbone_worker.families import ENCODER


@dataclass(frozen=True, eq=False)  # tensors: no elementwise ==
class Packing:
    """Where a padded batch's real tokens are. `tokens`: (N,) their positions in the flattened
    (B * T) batch; `slots`: (B * T,) each position's index among them, N for padding (a zero row
    `pad` appends)."""

    tokens: torch.Tensor
    slots: torch.Tensor
    rows: int
    length: int

    @classmethod
    def of(cls, mask: torch.Tensor) -> Packing:
        """From a (B, T) 1/0 attention mask (either padding side)."""
        rows, length = mask.shape
        tokens = mask.reshape(-1).nonzero().squeeze(1)
        slots = torch.full((rows * length,), len(tokens), dtype=torch.long, device=mask.device)
        slots[tokens] = torch.arange(len(tokens), device=mask.device)
        return cls(tokens, slots, rows, length)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (N, C)."""
        return x.reshape(self.rows * self.length, -1).index_select(0, self.tokens)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, T, C), zeros at the padding."""
        with_zero = F.pad(x, (0, 0, 0, 1))
        return with_zero.index_select(0, self.slots).view(self.rows, self.length, -1)


# The share of a batch's positions that must be padding for packing to pay (2 CPU cores, MiniLM,
# batch 32 x 48): 8 side networks on live states, each packing its own, were 20% slower packed at
# 6% padding, about even at 10-20%, 20% faster at 29%; a training step on the quick store's
# states (forward, backward, AdamW) even at 10-19%, 10% faster at 29%, 19% at 38%.
MIN_PADDING = 0.2


def packs(family: str) -> bool:
    """Whether side networks of this family can run packed."""
    return family == ENCODER


def worth_packing(family: str, mask: torch.Tensor) -> bool:
    """Whether a batch with this (B, T) mask runs packed: encoder side networks on a CPU, with at
    least MIN_PADDING of it padding. On a GPU side networks are bound by kernel launches (32
    texts a pass cost what 1 does: api/inference.py), which packing adds; not measured there."""
    if not packs(family) or mask.device.type != "cpu":
        return False
    return float(mask.sum()) <= (1 - MIN_PADDING) * mask.numel()


def packing_for(family: str, mask: torch.Tensor) -> Packing | None:
    """The packing of a batch with this mask where it is worth it (worth_packing), else None."""
    return Packing.of(mask) if worth_packing(family, mask) else None


def pack_stream(stream: dict, family: str) -> dict:
    """An encoder stream ({"states", "attention_mask"}) with its states packed once, for every
    side network that reads it (each would otherwise gather the same tokens itself), where worth
    it; otherwise as it is."""
    if "packing" in stream:
        return stream
    packing = packing_for(family, stream["attention_mask"])
    if packing is None:
        return stream
    states = {name: packing.pack(state) for name, state in stream["states"].items()}
    return {**stream, "states": states, "packing": packing}


def pack_batch(batch: dict, family: str) -> dict:
    """The batch with its encoder stream packed where worth it (pack_stream)."""
    enc = pack_stream(batch["enc"], family)
    return batch if enc is batch["enc"] else {**batch, "enc": enc}


def bert_block(block, x: torch.Tensor, packing: Packing, bias: torch.Tensor) -> torch.Tensor:
    """transformers' BertLayer.forward (self-attention, no cache or cross-attention) on packed
    tokens: x (N, d) -> (N, d). `bias`: the (B, 1, 1, T) additive attention mask."""
    if block.is_decoder or block.add_cross_attention or block.chunk_size_feed_forward:
        # families.side_config builds none of these; a block that has one is not this forward
        raise ValueError("packed side blocks are plain encoder BertLayers; run this one padded")
    attention = block.attention.self
    heads, head_size = attention.num_attention_heads, attention.attention_head_size
    # query, key and value as one product, padded once for attention
    weight = torch.cat([attention.query.weight, attention.key.weight, attention.value.weight])
    bias_qkv = torch.cat([attention.query.bias, attention.key.bias, attention.value.bias])
    qkv = packing.pad(F.linear(x, weight, bias_qkv))
    q, k, v = qkv.view(packing.rows, packing.length, 3, heads, head_size).permute(2, 0, 3, 1, 4)
    context = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=bias,
        dropout_p=attention.dropout.p if attention.training else 0.0,
        scale=attention.scaling,
    )
    context = packing.pack(context.transpose(1, 2))
    out = block.attention.output
    h = out.LayerNorm(out.dropout(out.dense(context)) + x)
    ffn = block.output
    inner = block.intermediate.intermediate_act_fn(block.intermediate.dense(h))
    return ffn.LayerNorm(ffn.dropout(ffn.dense(inner)) + h)

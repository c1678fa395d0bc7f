"""Side networks of one architecture run as one (grouped execution).

K side networks that differ only in their weights (a sweep's learning rates or seeds, or the
tasks served on one backbone) would otherwise run as K sequences of small matrix products. Here
their parameters are stacked on a leading axis and one forward pass is vectorised over it
(`torch.func.functional_call` under `torch.vmap`): each linear layer becomes one batched product.
Gradients flow back to each network's own parameters, so an optimizer sees K ordinary networks.
Buffers that every network holds identically (width maps, T5's frozen LM head) are passed once,
not stacked.
"""

from __future__ import annotations

import copy
import json
import warnings
from contextlib import nullcontext
from dataclasses import asdict

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from side_trainer.model import SideNetwork

# Fused attention has no vmap rule on the CPU: torch runs it once per network of the group
# (the rest of the block stays vectorised) and warns at every call. That is the intended path.
warnings.filterwarnings(
    "ignore", message=r"There is a performance drop because we have not yet implemented"
)

# Settings that do not change what a network's forward pass computes from its weights.
_NOT_IN_FORWARD = ("labels", "label_texts", "init", "max_length", "store_fingerprint", "backbone")


def architecture(net: SideNetwork) -> tuple:
    """What must be equal for networks to run as one group: every setting the forward pass
    reads (the group runs the first network's code) and every weight's shape and dtype."""
    settings = {k: v for k, v in asdict(net.cfg).items() if k not in _NOT_IN_FORWARD}
    shapes = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in net.state_dict().items())
    return (json.dumps(settings, sort_keys=True, default=str), shapes)


class SideGroup:
    """K side networks of one architecture; calling it returns the K outputs stacked (K, ...)."""

    def __init__(self, nets: list[SideNetwork], math_attention: bool | None = None):
        if not nets:
            raise ValueError("a group needs at least one side network")
        kinds = {architecture(n) for n in nets}
        if len(kinds) > 1:
            raise ValueError("side networks of different architectures cannot run as one group")
        self.nets = list(nets)
        # On CUDA, fused attention's memory-efficient kernel has a vmap rule that folds the
        # group into the batch of q, k and v but not of the shared mask: "attn_bias: wrong shape
        # (batch dimension)" (an H100 in inference, an H200 in training). Its math backend is
        # plain batched products, which vmap batches. None: that is where it is needed.
        if math_attention is None:
            math_attention = next(nets[0].parameters()).device.type == "cuda"
        self.math_attention = math_attention
        self._base = None
        if len(nets) > 1:
            self._base = copy.deepcopy(nets[0]).to("meta")  # the code, without any weights
            # The tensors themselves (optimizers update them in place), listed once.
            per_net = [dict(n.named_parameters()) for n in nets]
            self._params = [(name, [p[name] for p in per_net]) for name in per_net[0]]
            per_net = [dict(n.named_buffers()) for n in nets]
            self._buffers = [(name, [b[name] for b in per_net]) for name in per_net[0]]
            self._buffer_dims = {
                name: None if all(torch.equal(bs[0], b) for b in bs[1:]) else 0
                for name, bs in self._buffers
            }

    def __len__(self) -> int:
        return len(self.nets)

    def train(self, mode: bool = True) -> SideGroup:
        for net in self.nets:
            net.train(mode)
        if self._base is not None:
            self._base.train(mode)
        return self

    def eval(self) -> SideGroup:
        return self.train(False)

    def __call__(self, batch: dict, live: bool = False) -> torch.Tensor:
        """The K networks' outputs on one batch, stacked (K, ...). `live`: the batch holds the
        backbone's own states (each network maps them to its store's width)."""
        if self._base is None:
            return self.nets[0](batch, live=live).unsqueeze(0)
        params = {name: torch.stack(ps) for name, ps in self._params}
        buffers = {
            name: bs[0] if self._buffer_dims[name] is None else torch.stack(bs)
            for name, bs in self._buffers
        }
        base = self._base

        def one(p: dict, b: dict, x: dict) -> torch.Tensor:
            return functional_call(base, {**p, **b}, (x,), {"live": live}, strict=True)

        with sdpa_kernel(SDPBackend.MATH) if self.math_attention else nullcontext():
            return torch.vmap(one, in_dims=(0, self._buffer_dims, None), randomness="different")(
                params, buffers, batch
            )


def partition(nets: list[nn.Module]) -> list[list[int]]:
    """The networks' indices partitioned by architecture, in order of first appearance."""
    by_kind: dict[tuple, list[int]] = {}
    for index, net in enumerate(nets):
        by_kind.setdefault(architecture(net), []).append(index)
    return list(by_kind.values())


def groups_of(nets: list[nn.Module]) -> list[tuple[list[int], SideGroup]]:
    """The networks partitioned into groups of one architecture: (their indices, the group),
    in order of first appearance."""
    return [(idx, SideGroup([nets[i] for i in idx])) for idx in partition(nets)]

"""Importance of backbone weights for the structural pruning init of the side network.

Per weight element: the empirical Fisher (sum over examples, batch size 1, of the squared gradient
of the task loss) or the weight magnitude. The side network prunes whole rows and columns, so only
the L1 norm of each row and each column is kept: a few vectors per block, small enough to ship in
`importance.safetensors` beside the store, where a trainer (which never loads the backbone) reads
them. Encoders and decoder-only backbones have no task head, so the task loss uses a linear probe
fitted on the frozen pooled features first; T5 uses its own LM loss on the label text.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from backbone_worker.backbone import Backbone
from backbone_worker.families import DECODER, ENCODER_DECODER

log = logging.getLogger(__name__)

def block_parameters(backbone: Backbone, layers: list[int]) -> dict[str, torch.nn.Parameter]:
    """Parameters of the kept blocks, keyed "stream/i/in-block name"."""
    out = {}
    for stream in backbone.family.streams:
        blocks = backbone._blocks(stream)
        for i in layers:
            for name, param in blocks[i].named_parameters():
                out[f"{stream}/{i}/{name}"] = param
    return out


def _reduce(method: str, key: str, element_scores: torch.Tensor) -> dict[str, torch.Tensor]:
    scores = element_scores.abs().float()
    if scores.dim() == 1:
        return {f"{method}/{key}/row": scores}
    return {f"{method}/{key}/row": scores.sum(1), f"{method}/{key}/col": scores.sum(0)}


def _pool(backbone: Backbone, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) -> (B, d): last real token for causal models, masked mean otherwise."""
    if backbone.family.name == DECODER:
        last = mask.sum(1) - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def _fit_probe(features: torch.Tensor, targets: torch.Tensor, n_labels: int) -> torch.nn.Linear:
    probe = torch.nn.Linear(features.shape[1], n_labels)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        F.cross_entropy(probe(features), targets).backward()
        optimizer.step()
    return probe.requires_grad_(False)


def fisher_scores(backbone: Backbone, layers: list[int], texts: list[str], pairs: list[str] | None,
                  labels: list[str], label_names: list[str], max_length: int) -> dict[str, torch.Tensor]:
    params = block_parameters(backbone, layers)
    squares = {key: torch.zeros_like(p) for key, p in params.items()}
    probe = None
    if backbone.family.name != ENCODER_DECODER:
        with torch.inference_mode():
            feats = []
            for start in range(0, len(texts), 64):
                enc = backbone.tokenize(texts[start:start + 64],
                                        pairs[start:start + 64] if pairs else None, max_length)
                out = backbone.run(enc)
                feats.append(_pool(backbone, out.last_hidden_state, enc["attention_mask"]))
        targets = torch.tensor([label_names.index(y) for y in labels])
        probe = _fit_probe(torch.cat(feats).float().cpu(), targets, len(label_names))
        probe.to(backbone.model.device)
    for p in params.values():
        p.requires_grad_(True)
    try:
        for k in tqdm(range(len(texts)), desc="fisher", leave=False, mininterval=1.0):
            enc = backbone.tokenize([texts[k]], [pairs[k]] if pairs else None, max_length)
            if probe is None:
                out = backbone.run(enc, backbone.tokenize_targets([labels[k]]))
                loss = out.loss
            else:
                out = backbone.run(enc)
                pooled = _pool(backbone, out.last_hidden_state, enc["attention_mask"])
                target = torch.tensor([label_names.index(labels[k])], device=pooled.device)
                loss = F.cross_entropy(probe(pooled), target)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for key, grad in zip(params, grads):
                if grad is not None:
                    squares[key] += grad.detach() ** 2
    finally:
        for p in params.values():
            p.requires_grad_(False)
    scores = {}
    for key, square in squares.items():
        scores.update(_reduce("fisher", key, square))
    return scores


def magnitude_scores(backbone: Backbone, layers: list[int]) -> dict[str, torch.Tensor]:
    scores = {}
    for key, param in block_parameters(backbone, layers).items():
        scores.update(_reduce("magnitude", key, param.detach()))
    return scores

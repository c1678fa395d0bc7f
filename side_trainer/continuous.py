"""Continuous batching for generation: requests join a running batch at the next step and leave
it the step they finish, each with its own side network (or none), its own sampling settings and
its own length limit; one backbone step serves every request in flight.

The batch is `side_trainer.decoding.Decoder`'s, kept between steps: rows padded on the left to one
length, the backbone's KV cache over every row, and one KV cache per side network over its rows
(in batch order), the attention mask and each row's position ids counted over its real tokens. A
request joining is prefilled alone (its prompt through the backbone and its side network, each
into a fresh cache), its first token chosen, and its caches padded on the left to the batch's
length (or the batch's to its) and appended as a row: one copy of the caches per join. A
finished row is dropped from every cache (one copy), and columns that are padding in every row
left are cut. Between joins and leaves a step costs what `Decoder`'s does.

A request's tokens are those `Decoder.generate` gives for its prompt alone (greedy: the same ids;
tests/test_continuous.py), whatever else shares its steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from side_trainer.decoding import Decoder, Generation, Sampling, catching, side_step


@dataclass
class Request:
    """One generation: prompt ids, the side network's key in the decoder's `nets` (None: the bare
    backbone), sampling settings, and `on_token(request, token_id)` / `on_done(request)`
    callbacks (called from the thread that steps)."""

    prompt: list[int]
    net: str | None
    sampling: Sampling = field(default_factory=Sampling)
    on_token: Callable | None = None
    on_done: Callable | None = None
    generation: Generation | None = None
    generator: torch.Generator | None = None
    cancelled: bool = False


def _layers(cache: DynamicCache) -> list:
    return [layer for layer in cache.layers if layer.keys is not None and layer.keys.numel()]


def _pad_left(cache: DynamicCache, n: int) -> None:
    """n zero columns before every row's keys and values (masked out: never attended)."""
    if n <= 0:
        return
    for layer in _layers(cache):
        for name in ("keys", "values"):
            t = getattr(layer, name)
            pad = t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3])
            setattr(layer, name, torch.cat([pad, t], 2))


def _append_rows(cache: DynamicCache, other: DynamicCache) -> None:
    """`other`'s rows after `cache`'s (both of one length)."""
    for layer, extra in zip(_layers(cache), _layers(other)):
        layer.keys = torch.cat([layer.keys, extra.keys], 0)
        layer.values = torch.cat([layer.values, extra.values], 0)


def _keep(cache: DynamicCache, rows: torch.Tensor | None, start: int) -> None:
    """Only `rows` (all when None), from column `start` on."""
    for layer in _layers(cache):
        for name in ("keys", "values"):
            t = getattr(layer, name)
            if rows is not None:
                t = t[rows]
            setattr(layer, name, t[:, :, start:])


class ContinuousDecoder(Decoder):
    """`add` requests at any time; each `step` advances every request in flight by one token."""

    def __init__(self, backbone, head, nets: dict, end_ids: list[int]):
        super().__init__(backbone, head, list(nets.values()), end_ids)
        self.by_key = dict(nets)
        self.rows: list[Request] = []
        self.mask = None  # (B, L + 1): the cache's L columns and the pending token's
        self.positions = None  # (B,) the pending token's position id
        self.pending = None  # (B,) the token each row feeds next
        self.reset()

    def reset(self) -> None:
        """Drop every request (a failed step leaves the caches in no known state)."""
        self.rows, self.mask, self.positions, self.pending = [], None, None, None
        self.cache, self.side_caches = DynamicCache(), {}

    @property
    def active(self) -> int:
        return len(self.rows)

    def _nets_changed(self) -> None:
        self.layers = sorted(
            {i for n in self.by_key.values() if n is not None for i in n.cfg.layers}
        )

    def _drop_idle_nets(self) -> None:
        """Side networks that no request in flight uses leave the decoder, so that what stays
        in memory is the model registry's choice (its budget); a network's next request
        brings it back."""
        used = {r.net for r in self.rows}
        idle = [key for key in self.by_key if key not in used]
        for key in idle:
            del self.by_key[key]
        if idle:
            self._nets_changed()

    @torch.inference_mode()
    def add(self, request: Request, net=None) -> None:
        """Prefill `request` alone, choose its first token, and add it as a row (unless that
        token already ends it). `net`: the side network `request.net` names, if the decoder
        does not hold it."""
        if net is not None:
            self.by_key[request.net] = net
            self._nets_changed()
        device = self.backbone.model.device
        request.generation = Generation("", [], "length", len(request.prompt))
        request.generator = self._generator(request.sampling, device)
        ids = torch.tensor([request.prompt], device=device)
        mask = torch.ones_like(ids)
        positions = torch.arange(ids.shape[1], device=device)[None]
        cache, side_cache = DynamicCache(), DynamicCache()
        net = self.by_key[request.net] if request.net is not None else None
        layers = list(net.cfg.layers) if net is not None else []
        with catching(self.backbone, layers) as states:
            self.backbone.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=True,
            )  # fmt: skip
            last = states["final"][:, -1]
            if net is None:
                logits = self.head(last)
            else:
                side = side_step(net, dict(states), mask, positions, side_cache)
                logits = net.merged(last, side[:, -1])
        token = self._pick(request, logits[0])
        if self._record(request, token):
            self._drop_idle_nets()
            return
        self._join(request, cache, side_cache, mask, positions[:, -1] + 1, token)

    def _join(self, request, cache, side_cache, mask, position, token) -> None:
        device = mask.device
        one = torch.ones((1, 1), dtype=mask.dtype, device=device)
        mask = torch.cat([mask, one], 1)
        pending = torch.tensor([token], device=device)
        if not self.rows:
            self.rows, self.mask, self.positions, self.pending = [request], mask, position, pending
            self.cache, self.side_caches = cache, {}
            if request.net is not None:
                self.side_caches[request.net] = side_cache
            return
        width = self.mask.shape[1]
        if mask.shape[1] < width:
            gap = width - mask.shape[1]
            _pad_left(cache, gap)
            _pad_left(side_cache, gap)
            mask = torch.cat([mask.new_zeros(1, gap), mask], 1)
        elif mask.shape[1] > width:
            gap = mask.shape[1] - width
            _pad_left(self.cache, gap)
            for c in self.side_caches.values():
                _pad_left(c, gap)
            self.mask = torch.cat([self.mask.new_zeros(self.mask.shape[0], gap), self.mask], 1)
        _append_rows(self.cache, cache)
        if request.net is not None:
            group = self.side_caches.get(request.net)
            if group is None:  # the first row of its network in the batch
                self.side_caches[request.net] = side_cache
            else:
                _append_rows(group, side_cache)
        self.rows.append(request)
        self.mask = torch.cat([self.mask, mask], 0)
        self.positions = torch.cat([self.positions, position])
        self.pending = torch.cat([self.pending, pending])

    @torch.inference_mode()
    def step(self) -> None:
        """One token for every request in flight; finished ones (an end token, a stop string,
        their max_tokens, or cancelled) leave the batch."""
        if not self.rows:
            return
        groups: dict = {}
        for b, r in enumerate(self.rows):
            groups.setdefault(r.net, []).append(b)
        with catching(self.backbone, self.layers) as states:
            self.backbone.model(
                input_ids=self.pending[:, None],
                attention_mask=self.mask,
                position_ids=self.positions[:, None],
                cache=self.cache,
                use_cache=True,
            )
            logits = self._logits(
                states, self.mask, self.positions[:, None], groups, self.side_caches,
                self.by_key,
            )  # fmt: skip
        keep = []
        for b, r in enumerate(self.rows):
            token = self._pick(r, logits[b])
            if not self._record(r, token):
                keep.append(b)
                self.pending[b] = token
        self._leave(keep)
        if self.rows:
            one = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.mask.device)
            self.mask = torch.cat([self.mask, one], 1)
            self.positions = self.positions + 1

    def _leave(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        device = self.mask.device
        before = self.rows
        self.rows = [before[b] for b in keep]
        self._drop_idle_nets()
        index = torch.tensor(keep, dtype=torch.long, device=device)
        self.mask, self.positions, self.pending = (
            self.mask[index],
            self.positions[index],
            self.pending[index],
        )
        if not self.rows:
            self.cache, self.side_caches = DynamicCache(), {}
            return
        # Columns that are padding in every row left are cut.
        start = int((self.mask.sum(0) > 0).nonzero()[0])
        _keep(self.cache, index, start)
        self.mask = self.mask[:, start:]
        for key in list(self.side_caches):
            old = [b for b, r in enumerate(before) if r.net == key]
            kept = [k for k, b in enumerate(old) if b in set(keep)]
            if not kept:
                del self.side_caches[key]
                continue
            _keep(self.side_caches[key], torch.tensor(kept, device=device), start)

    def _pick(self, request: Request, logits: torch.Tensor) -> int:
        return int(self._choose(logits[None], request.sampling, request.generator)[0])

    def _record(self, request: Request, token: int) -> bool:
        """Take the chosen token; True when the request is finished."""
        g = request.generation
        finished = request.cancelled
        if not finished and token in self.end_ids and not request.sampling.ignore_end:
            g.finish_reason, finished = "stop", True
        elif not finished:
            g.token_ids.append(token)
            if request.on_token is not None:
                request.on_token(request, token)
            if request.sampling.stop and self._stopped(g, request.sampling.stop):
                g.finish_reason, finished = "stop", True
            elif len(g.token_ids) >= request.sampling.max_tokens:
                finished = True
        if finished:
            self._finish([g], request.sampling)
            if request.on_done is not None:
                request.on_done(request)
        return finished


__all__ = ["ContinuousDecoder", "Request"]

"""Generation with a frozen decoder-only backbone and generative side networks: our own loop,
with two KV caches (the backbone's, and each side network's own).

Each step runs the backbone on the new tokens with its cache, catching the states the side
networks read (the embeddings, their kept layers' outputs, and the last block's output h_L) as
each block finishes; then every side network runs its rows' new positions with its cache, and
each row's logits are `net.merged(h_L, side)` (or the backbone's own head for a row with no
side network). A batch holds prompts of different lengths, padded on the left, with position ids
counted over each row's real tokens, as in training (where rows are padded on the right).

Greedy decoding (temperature 0) or sampling (temperature, top_p, a seed); a row stops at an end
token (the template's end of turn, EOS) or a stop string, or after `max_tokens`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from backbone_worker.backbone import Backbone, block_input
from side_trainer.generative import FrozenLMHead, GenerativeSideNetwork
from side_trainer.model import additive_mask


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_end: bool = False  # run to max_tokens past end tokens (benchmarks: vLLM's ignore_eos)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (an end token or a stop string) or "length"
    prompt_tokens: int
    # Per step, the logits the token was chosen from (kept only when asked: tests compare them)
    logits: list[torch.Tensor] = field(default_factory=list, repr=False)


def last_block(backbone: Backbone) -> int:
    return backbone.num_layers() - 1


@contextmanager
def catching(backbone: Backbone, layers: list[int]):
    """While open, every backbone forward fills the yielded dict with "emb", "layer_i" for each
    of `layers` and "final" (the last block's output, h_L)."""
    blocks = backbone._blocks("enc")
    caught: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_module, _inputs, output):
            caught[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def keep_input(_module, args, kwargs):
        caught["emb"] = block_input(args, kwargs)

    handles = [blocks[0].register_forward_pre_hook(keep_input, with_kwargs=True)]
    handles += [blocks[i].register_forward_hook(keep(f"layer_{i}")) for i in set(layers)]
    handles.append(blocks[last_block(backbone)].register_forward_hook(keep("final")))
    try:
        yield caught
    finally:
        for handle in handles:
            handle.remove()


def side_step(
    net: GenerativeSideNetwork,
    states: dict[str, torch.Tensor],
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: DynamicCache,
) -> torch.Tensor:
    """The side stream at the new positions (B, q, d/r), from the backbone's live states at
    them; `mask` (B, kv) covers every position so far, the new ones last."""
    stack = net.streams["enc"]
    h = stack.live_ladder("emb", states["emb"])
    q, kv = h.shape[1], mask.shape[1]
    past = kv - q
    keep = mask[:, None, None, :].bool()
    steps = torch.arange(kv, device=mask.device)
    causal = steps[None, :] <= (past + torch.arange(q, device=mask.device))[:, None]  # (q, kv)
    keep = keep & causal[None, None]
    attn = torch.zeros(keep.shape, dtype=h.dtype, device=h.device).masked_fill(
        ~keep, torch.finfo(h.dtype).min
    )
    extra = {"position_ids": positions, "position_embeddings": stack.rotary(h, positions)}
    mu = stack.gates()
    for j, i in enumerate(stack.layers):
        h = torch.lerp(stack.live_ladder(f"layer_{i}", states[f"layer_{i}"]), h, mu[j])
        out = stack.blocks[j](h, attention_mask=attn, cache=cache, use_cache=True, **extra)
        h = out[0] if isinstance(out, tuple) else out
    return stack.final_norm(h)


class Decoder:
    """Generates for a batch of prompts, each row with one of `nets` (or None: the backbone)."""

    def __init__(
        self,
        backbone: Backbone,
        head: FrozenLMHead,
        nets: list[GenerativeSideNetwork | None],
        end_ids: list[int],
    ):
        self.backbone, self.head, self.nets = backbone, head, nets
        self.end_ids = set(end_ids)
        self.layers = sorted({i for n in nets if n is not None for i in n.cfg.layers})

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        row_nets: list[int] | None = None,
        keep_logits: bool = False,
    ) -> list[Generation]:
        """`row_nets[b]`: the index into `nets` of row b's network (default: all the first)."""
        device = self.backbone.model.device
        n = len(prompts)
        row_nets = row_nets if row_nets is not None else [0] * n
        ids, mask = self._padded(prompts, left=True)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        generator = self._generator(sampling, device)
        groups = {k: [b for b in range(n) if row_nets[b] == k] for k in set(row_nets)}
        backbone_cache = DynamicCache()
        side_caches = {k: DynamicCache() for k in groups if self.nets[k] is not None}
        out = [Generation("", [], "length", len(p)) for p in prompts]
        done = [False] * n
        new_ids, new_positions = ids, positions
        with catching(self.backbone, self.layers) as states:
            for _ in range(sampling.max_tokens):
                self.backbone.model(
                    input_ids=new_ids,
                    attention_mask=mask,
                    position_ids=new_positions,
                    cache=backbone_cache,
                    use_cache=True,
                )
                logits = self._logits(states, mask, new_positions, groups, side_caches)
                chosen = self._choose(logits, sampling, generator)
                self._take(out, done, chosen, logits, sampling, keep_logits)
                if all(done):
                    break
                new_ids = chosen[:, None]
                new_positions = new_positions[:, -1:] + 1
                mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], 1)
        return self._finish(out, sampling)

    def _padded(self, prompts: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts as one (B, longest) batch of ids and its attention mask."""
        device = self.backbone.model.device
        longest = max(len(p) for p in prompts)
        pad = self.backbone.tokenizer.pad_token_id or 0
        ids = torch.full((len(prompts), longest), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long, device=device)
        for b, prompt in enumerate(prompts):
            at = slice(longest - len(prompt), longest) if left else slice(0, len(prompt))
            ids[b, at] = torch.tensor(prompt, device=device)
            mask[b, at] = 1
        return ids, mask

    @staticmethod
    def _generator(sampling: Sampling, device) -> torch.Generator | None:
        if sampling.temperature <= 0:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else 0)
        return generator

    def _take(self, out, done, chosen, logits, sampling: Sampling, keep_logits: bool) -> None:
        """Each unfinished row's chosen token: appended, or its end (an end token, which is not
        kept, or a stop string)."""
        for b in range(len(out)):
            if done[b]:
                continue
            token = int(chosen[b])
            if keep_logits:
                out[b].logits.append(logits[b].float().cpu())
            if token in self.end_ids and not sampling.ignore_end:
                done[b], out[b].finish_reason = True, "stop"
                continue
            out[b].token_ids.append(token)
            if sampling.stop and self._stopped(out[b], sampling.stop):
                done[b], out[b].finish_reason = True, "stop"

    def _finish(self, out: list[Generation], sampling: Sampling) -> list[Generation]:
        tokenizer = self.backbone.tokenizer
        for g in out:
            text = tokenizer.decode(g.token_ids, skip_special_tokens=True)
            if g.finish_reason == "stop" and sampling.stop:
                text = _cut(text, sampling.stop)
            g.text = text
        return out

    def _logits(self, states, mask, positions, groups, side_caches, nets=None) -> torch.Tensor:
        """Each row's next-token logits (B, vocab). `groups`: a network's key (an index into
        `nets`, default self.nets; None or a None network: the bare backbone) -> its rows.
        Each side network joins its rows' last states; the frozen head then reads every row
        in one product, so its weight (SmolLM2's: 113 MB) is read once a step, not once for
        each side model in the batch. Every network's frozen head is the backbone's: the
        same weights as `self.head`."""
        nets = self.nets if nets is None else nets
        last = states["final"][:, -1]
        joined = self.head.normalize(last)
        for k, rows in groups.items():
            net = None if k is None else nets[k]
            if net is None:
                continue
            index = torch.tensor(rows, device=last.device)
            picked = {name: s[index] for name, s in states.items()}
            side = side_step(net, picked, mask[index], positions[index], side_caches[k])
            joined[index] = net.joined(last[index], side[:, -1]).to(joined.dtype)
        return self.head.project(joined)

    @staticmethod
    def _choose(logits: torch.Tensor, sampling: Sampling, generator) -> torch.Tensor:
        if sampling.temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / sampling.temperature, -1)
        if sampling.top_p < 1:
            sorted_probs, order = probs.sort(-1, descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked higher
            sorted_probs = sorted_probs.masked_fill(before >= sampling.top_p, 0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    def _stopped(self, g: Generation, stop: tuple[str, ...]) -> bool:
        # Only the tail can hold a stop string the last token completed.
        tail = self.backbone.tokenizer.decode(g.token_ids[-16:], skip_special_tokens=True)
        return any(s in tail for s in stop)


class Seq2SeqDecoder(Decoder):
    """Generates with T5 side models (the reference's side decoder, writing through the frozen LM
    head) or the bare T5 (a None net). Each step runs the backbone and the side network again
    over the prompt and the tokens so far: no KV caches, so a reply of T tokens costs ~T/2 times
    a cached loop's work (the decoder-only loop, `Decoder`, keeps caches)."""

    def __init__(self, backbone: Backbone, nets: list, end_ids: list[int]):
        super().__init__(backbone, None, nets, end_ids)  # T5 writes through its own LM head

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        row_nets: list[int] | None = None,
        keep_logits: bool = False,
    ) -> list[Generation]:
        """`prompts`: encoder input ids (chat.seq2seq_source, tokenized with its end token)."""
        device = self.backbone.model.device
        n = len(prompts)
        row_nets = row_nets if row_nets is not None else [0] * n
        ids, mask = self._padded(prompts, left=False)  # T5's encoder: padding on the right
        pad = self.backbone.tokenizer.pad_token_id or 0
        enc = {"input_ids": ids, "attention_mask": mask}
        generator = self._generator(sampling, device)
        groups = {k: [b for b in range(n) if row_nets[b] == k] for k in set(row_nets)}
        out = [Generation("", [], "length", len(p)) for p in prompts]
        done = [False] * n
        written = torch.zeros((n, 0), dtype=torch.long, device=device)
        for _ in range(sampling.max_tokens):
            # The decoder reads its start token and the tokens so far (the backbone shifts its
            # targets right): the last position's logits choose the next token.
            targets = torch.cat([written, torch.full((n, 1), pad, device=device)], 1)
            dec = {"input_ids": targets, "attention_mask": torch.ones_like(targets)}
            logits = self._logits(enc, dec, groups)
            chosen = self._choose(logits, sampling, generator)
            self._take(out, done, chosen, logits, sampling, keep_logits)
            if all(done):
                break
            written = torch.cat([written, chosen[:, None]], 1)
        return self._finish(out, sampling)

    def _logits(self, enc, dec, groups) -> torch.Tensor:
        """Each row's next-token logits (B, vocab)."""
        states = self.backbone.ladder_states(self.layers, enc, dec) if self.layers else None
        bare = None
        if any(self.nets[k] is None for k in groups):
            bare = self.backbone.run(enc, dec).logits[:, -1]
        logits = None
        for k, rows in groups.items():
            net = self.nets[k]
            index = torch.tensor(rows, device=enc["input_ids"].device)
            if net is None:
                part = bare[index]
            else:
                batch = {
                    s: {
                        "states": {name: x[index] for name, x in states[s].items()},
                        "attention_mask": inputs["attention_mask"][index],
                    }
                    for s, inputs in (("enc", enc), ("dec", dec))
                }
                part = net(batch, live=True)[:, -1]
            if logits is None:
                logits = part.new_empty((enc["input_ids"].shape[0], part.shape[-1]))
            logits[index] = part
        return logits


def _cut(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to its first stop string."""
    at = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:at]


@torch.inference_mode()
def full_logits(
    backbone: Backbone, net: GenerativeSideNetwork | None, head: FrozenLMHead, ids: list[int]
) -> torch.Tensor:
    """Logits (T, vocab) at every position of one sequence, recomputed from scratch (no cache):
    what the cached loop must match."""
    device = backbone.model.device
    enc = {
        "input_ids": torch.tensor([ids], device=device),
        "attention_mask": torch.ones((1, len(ids)), dtype=torch.long, device=device),
    }
    layers = list(net.cfg.layers) if net is not None else []
    with catching(backbone, layers) as states:
        backbone.run(enc)
    if net is None:
        return head(states["final"][0])
    h = net.streams["enc"](
        {k: v for k, v in states.items() if k != "final"}, enc["attention_mask"], live=True
    )
    return net.merged(states["final"][0], h[0])


__all__ = ["Decoder", "Generation", "Sampling", "Seq2SeqDecoder", "additive_mask", "full_logits"]

"""The ladder side network (LST, Sung et al. 2022), for encoder, encoder-decoder and decoder-only
backbones.

For every stream ("enc", and "dec" for T5) the side stream starts as `down_emb(embeddings)`; before
side block j, which sits beside kept backbone layer i, a gate mixes in that layer's output:

    h = mu_j * h + (1 - mu_j) * down_i(backbone_i),   mu_j = sigmoid(alpha_j / T),  alpha_j = 0

Side blocks are the backbone's own block class at width d/r (encoders: with fewer heads, see
`default_side_heads`; other families keep the backbone's heads). The
backbone states arrive precomputed (from the activation store or from a live backbone pass), so no
gradient can reach a backbone parameter: the side network never holds one.

Encoder side streams skip the padding of batches that have much of it (side_trainer/packing.py);
the others run padded.

Heads: encoders and decoder-only models pool the side stream (masked mean, or the last real token
for causal models), apply the final side norm, upsample to d and classify (dense, tanh, out_proj).
T5 upsamples every side-decoder position and applies the frozen backbone LM head (label words).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from backbone_worker.families import DECODER, ENCODER, ENCODER_DECODER, family_by_name, make_block
from side_trainer.packing import Packing, bert_block, packing_for, packs

TASKS = ("classify", "generate")


@dataclass
class SideConfig:
    family: str  # encoder | encoder-decoder | decoder
    backbone: str  # alias or model directory the states came from
    backbone_fingerprint: str  # sha256 of the backbone files
    backbone_config: dict  # the backbone's transformers config, to rebuild blocks at d/r
    layers: list[int]  # kept backbone layers: one ladder + side block each
    labels: list[str]  # class names; a class's index is its position
    reduction: int = 8  # r: side width = d / r
    gate_temperature: float = 0.1  # T in mu = sigmoid(alpha / T)
    pooling: str = "mean"  # encoder: side_trainer.options.POOLINGS; decoder-only: last
    classifier_dropout: float = 0.1
    init: str = "fisher"  # fisher | magnitude | random (structural pruning init)
    max_length: int = 128
    store_fingerprint: str = ""  # the activation store the network was trained from
    label_texts: list[str] = field(default_factory=list)  # T5: the text the decoder emits per class
    text_pair: bool = False  # trained on (text, text_pair) inputs: predictions need both
    # The store's width map (cache_store/projection.py: kind, width K, normalize), or None: the
    # ladders then read K-wide states, and live states go through the same map first.
    projection: dict | None = None
    # RMS-normalise each backbone state before its ladder; None = the family's default (on for
    # decoder-only models, whose residual streams carry massive activations, off otherwise).
    ladder_norm: bool | None = None
    # Attention heads of the side blocks; None: the backbone's count (every model saved before
    # this field existed). Encoders only (families.side_config).
    heads: int | None = None
    # "classify", or "generate": a decoder-only side network writing through the backbone's
    # frozen LM head (side_trainer/generative.py; T5's side decoder writes through it anyway),
    # with its final norm (`final_norm`: kind, eps; decoder-only),
    # the token ids that end a turn (`end_ids`) and how its data was rendered (`template`:
    # backbone_worker/chat.py).
    task: str = "classify"
    final_norm: dict | None = None
    end_ids: list[int] = field(default_factory=list)
    template: str | None = None
    # Where a decoder-only generative network's output joins the backbone's last state:
    # "post_norm", after the frozen final norm (new networks), or "pre_norm", before it (the
    # networks saved before this field; side_trainer/generative.py).
    join: str = "pre_norm"

    def __post_init__(self):
        from backbone_worker.options import OptionError
        from side_trainer.options import INITS, POOLINGS

        family_by_name(self.family)
        for name, value, allowed in (
            ("pooling", self.pooling, POOLINGS),
            ("init", self.init, INITS),
        ):
            if value not in allowed:
                raise OptionError(
                    f"side config {name} {value!r} is not one of {', '.join(allowed)}"
                )
        if self.reduction < 1:
            raise OptionError(f"side config reduction {self.reduction} must be at least 1")
        if self.task not in TASKS:
            raise OptionError(f"side config task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.task == "generate" and self.family not in (DECODER, ENCODER_DECODER):
            raise OptionError(
                f"generative side networks need a decoder-only or encoder-decoder (T5) "
                f"backbone, not {self.family}"
            )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> SideConfig:
        return cls(**json.loads(path.read_text()))

    def hf_backbone_config(self) -> PretrainedConfig:
        data = dict(self.backbone_config)
        return AutoConfig.for_model(data.pop("model_type"), **data)


def rms_normalize(x: torch.Tensor) -> torch.Tensor:
    """Each token's state divided by its root mean square (eps 1e-6), in float32 (squares of
    decoder-only states overflow fp16); cache_store.projection.rms_normalize is the store's."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype, causal: bool = False) -> torch.Tensor:
    """(B, T) 1/0 mask -> additive (B, 1, 1, T), or (B, 1, T, T) with the causal triangle."""
    neg = torch.finfo(dtype).min
    keep = mask[:, None, None, :].bool()
    if causal:
        t = mask.shape[1]
        keep = keep & torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()[None, None]
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, neg)


def last_token(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) -> (B, d): each row's last real token (right padding), the one a causal model
    has let see the whole text."""
    return h[torch.arange(h.shape[0], device=h.device), mask.sum(1) - 1]


class SideStack(nn.Module):
    """Ladders, gates and side blocks of one stream."""

    def __init__(self, cfg: SideConfig, side_config: PretrainedConfig, stream: str, width: int):
        super().__init__()
        family = family_by_name(cfg.family)
        side_width = width // cfg.reduction
        self.family = family.name
        self.layers = list(cfg.layers)
        self.projection = cfg.projection
        self.temperature = cfg.gate_temperature
        names = ["emb"] + [f"layer_{i}" for i in cfg.layers]
        state_width = cfg.projection["width"] if cfg.projection else width
        self.ladders = nn.ModuleDict({name: nn.Linear(state_width, side_width) for name in names})
        for ladder in self.ladders.values():
            nn.init.normal_(ladder.weight, std=0.01)
            nn.init.zeros_(ladder.bias)
        self.gate_alpha = nn.Parameter(torch.zeros(len(cfg.layers)))
        self.ladder_norm = (
            cfg.ladder_norm if cfg.ladder_norm is not None else family.name == DECODER
        )
        if cfg.projection:
            # The width map holds the states (normalised first where the family wants it, as
            # cache_store.projection records): (d, K) per state, saved with the model.
            self.ladder_norm = False
            for name in names:
                self.register_buffer(f"projection_{name}", torch.zeros(width, state_width))
        self.blocks = nn.ModuleList(
            make_block(family, side_config, stream, j) for j in range(len(cfg.layers))
        )
        if family.name == ENCODER_DECODER:
            from transformers.models.t5.modeling_t5 import T5LayerNorm

            self.final_norm = T5LayerNorm(side_width, eps=side_config.layer_norm_epsilon)
        elif family.name == DECODER:
            from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

            self.final_norm = LlamaRMSNorm(side_width, eps=side_config.rms_norm_eps)
            self.rotary = LlamaRotaryEmbedding(side_config)
            # The pruning init gives the side rotary embedding its kept pairs' frequencies, so
            # they are part of the trained model: saved with the weights (transformers registers
            # inv_freq as non-persistent, and a reload would rebuild the default ones).
            self.rotary.register_buffer("inv_freq", self.rotary.inv_freq, persistent=True)
        else:
            self.final_norm = nn.Identity()  # BERT blocks end in their own LayerNorm

    def ladder(self, name: str, state: torch.Tensor) -> torch.Tensor:
        """Downsample one backbone state to the side width. Decoder-only backbones keep a few
        channels of their residual stream (mostly at the first token, the attention sink) at
        thousands of times the typical size: SmolLM2-135M's layer 11 has RMS 1,030 at token 0 and
        6 elsewhere. Normalising each token's state first keeps those from swamping the side
        stream; the ladder's own weights then learn the per-channel scale."""
        ladder = self.ladders[name]
        if self.ladder_norm:
            state = rms_normalize(state).to(ladder.weight.dtype)
        return ladder(state)

    def live_ladder(self, name: str, state: torch.Tensor) -> torch.Tensor:
        """`ladder(name, project(name, state))` for a live backbone state (B, T, d), in one
        product: the width map (d, K) folded into the ladder's (d/r, K) weight gives a (d/r, d)
        one. Per token that is d x d/r multiply-adds instead of d x K + K x d/r (MiniLM, K 96:
        18,432 against 41,472), for d/r x K x d to fold (1.8 M): cheaper from ~77 tokens a pass
        (a batch of 32 tweets holds ~1,000), a few microseconds dearer below. Networks that
        share one width map are cheaper still when it runs once for all (api/inference.py)."""
        if self.projection is None:
            return self.ladder(name, state)
        ladder = self.ladders[name]
        x = self._map_input(state)
        weight = ladder.weight @ getattr(self, f"projection_{name}").to(ladder.weight.dtype).T
        return nn.functional.linear(x.to(weight.dtype), weight, ladder.bias)

    def project(self, name: str, state: torch.Tensor) -> torch.Tensor:
        """A live backbone state (B, T, d) -> what the store would hold for it (B, T, K): the
        identity without a width map."""
        if self.projection is None:
            return state
        matrix = getattr(self, f"projection_{name}")
        # in the network's dtype, as its ladders
        return (self._map_input(state) @ matrix.float()).to(matrix.dtype)

    def _map_input(self, state: torch.Tensor) -> torch.Tensor:
        """A live state as the width map takes it: float32, RMS-normalised where the store's
        map was fitted on normalised states (cache_store.projection)."""
        x = state.float()
        return rms_normalize(x) if self.projection["normalize"] else x

    def gates(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_alpha / self.temperature)

    def forward(
        self,
        states: dict[str, torch.Tensor],
        mask: torch.Tensor,
        cross: torch.Tensor | None = None,
        cross_mask: torch.Tensor | None = None,
        live: bool = False,
        packing: Packing | None = None,
    ):
        """`live`: the states are the backbone's own (B, T, d), not the store's (see
        live_ladder). `packing`: the states are packed (N, C) by it (side_trainer/packing.py)."""
        run = self.begin(states["emb"], mask, cross, cross_mask, live=live, packing=packing)
        for j, i in enumerate(self.layers):
            self.step(run, j, states[f"layer_{i}"])
        return self.end(run)  # (B, T, d/r)

    # The forward pass in three steps, so joint inference can advance side block j as soon as
    # backbone layer i is out (while the backbone computes layer i+1).

    def begin(
        self,
        emb: torch.Tensor,
        mask: torch.Tensor,
        cross: torch.Tensor | None = None,
        cross_mask: torch.Tensor | None = None,
        live: bool = False,
        packing: Packing | None = None,
    ) -> dict:
        """`packing`: emb and the states `step` gets are packed by it. Without one, an encoder
        stream packs each state itself where there is enough padding to skip (worth_packing)."""
        ladder = self.live_ladder if live else self.ladder
        if packing is not None and not packs(self.family):
            raise ValueError(f"{self.family} side networks do not run packed; pass padded states")
        own_packing = False  # whether the states arrive padded and are packed here
        if packing is None:
            packing = packing_for(self.family, mask)
            own_packing = packing is not None
            if own_packing:
                emb = packing.pack(emb)
        h = ladder("emb", emb)  # (B, T, d/r), or (N, d/r) packed
        dtype = h.dtype
        causal = self.family == DECODER or cross is not None
        extra: dict = {}
        if self.family == DECODER:
            positions = torch.arange(h.shape[1], device=h.device)[None].expand(h.shape[0], -1)
            extra = {"position_ids": positions, "position_embeddings": self.rotary(h, positions)}
        if cross is not None:
            extra = {
                "encoder_hidden_states": cross,
                "encoder_attention_mask": additive_mask(cross_mask, dtype),
            }
        return {
            "h": h,
            "attn": additive_mask(mask, dtype, causal=causal),
            "extra": extra,
            "mu": self.gates(),
            "bias": None,
            "ladder": ladder,
            "packing": packing,
            "own_packing": own_packing,
        }

    def step(self, run: dict, j: int, ladder_state: torch.Tensor) -> None:
        """Gate in kept layer j's backbone state, then side block j."""
        i, block, mu, packing = self.layers[j], self.blocks[j], run["mu"], run["packing"]
        if run["own_packing"]:
            ladder_state = packing.pack(ladder_state)
        # mu * h + (1 - mu) * ladder, as one fused op
        h = torch.lerp(run["ladder"](f"layer_{i}", ladder_state), run["h"], mu[j])
        if packing is not None:
            h = bert_block(block, h, packing, run["attn"])
        elif self.family == ENCODER_DECODER:
            h, run["bias"], _ = block(
                h, attention_mask=run["attn"], position_bias=run["bias"], **run["extra"]
            )
        else:
            out = block(h, attention_mask=run["attn"], **run["extra"])
            h = out[0] if isinstance(out, tuple) else out
        run["h"] = h

    def end(self, run: dict) -> torch.Tensor:
        """The stream's output (B, T, d/r), padded again where it ran packed."""
        h = self.final_norm(run["h"])
        return h if run["packing"] is None else run["packing"].pad(h)


class SideNetwork(nn.Module):
    def __init__(self, cfg: SideConfig):
        super().__init__()
        self.cfg = cfg
        family = family_by_name(cfg.family)
        backbone_config = cfg.hf_backbone_config()
        self.side_config = family.side_config(backbone_config, cfg.reduction, cfg.heads)
        width = family.hidden_size(backbone_config)
        side_width = width // cfg.reduction
        self.streams = nn.ModuleDict(
            {s: SideStack(cfg, self.side_config, s, width) for s in family.streams}
        )
        self._make_head(backbone_config, width, side_width)

    def _make_head(self, backbone_config: PretrainedConfig, width: int, side_width: int) -> None:
        """What turns the side stream into outputs (a generative network writes its own:
        side_trainer/generative.py)."""
        self.upsample = nn.Linear(side_width, width)
        if self.cfg.family == ENCODER_DECODER:
            # Frozen backbone LM head, filled from the backbone checkpoint (never trained or saved).
            self.register_buffer(
                "lm_head", torch.zeros(backbone_config.vocab_size, width), persistent=False
            )
            tied = getattr(backbone_config, "tie_word_embeddings", True)
            self.lm_scale = width**-0.5 if tied else 1.0
        else:
            self.classifier = nn.Sequential(
                nn.Linear(width, width),
                nn.Tanh(),
                nn.Dropout(self.cfg.classifier_dropout),
                nn.Linear(width, len(self.cfg.labels)),
            )

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, d/r) -> (B, d/r)."""
        if self.cfg.family == DECODER:
            return last_token(h, mask)
        if self.cfg.pooling == "first":
            return h[:, 0]
        if self.cfg.pooling == "max":
            return h.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(h.dtype).min).amax(1)
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)

    def head(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Classification logits (B, n_labels) from the side encoder's output (B, T, d/r)."""
        return self.classifier(self.upsample(self.pool(h, mask)))

    def project_states(self, stream: str, states: dict[str, torch.Tensor]) -> dict:
        """Live backbone states of one stream -> this network's inputs (the store's width map)."""
        stack = self.streams[stream]
        return {
            name: stack.project(name, state)
            for name, state in states.items()
            if name in stack.ladders
        }

    def projection_key(self) -> str | None:
        """A digest of this network's width maps (equal for networks trained from one store),
        or None without any. Computed once, again only if a map is written to."""
        maps = [
            (n, b)
            for n, b in self.named_buffers()
            if n.rsplit(".", 1)[-1].startswith("projection_")
        ]
        if not maps:
            return None
        # Which tensors, and how often each was written to (tensors made in inference mode keep
        # no count: they cannot be written to outside it).
        seen = tuple((id(b), -1 if b.is_inference() else b._version) for _, b in maps)
        if getattr(self, "_projection_key", (None, None))[0] != seen:
            digest = hashlib.blake2b(json.dumps(self.cfg.projection).encode(), digest_size=16)
            for name, b in maps:
                digest.update(name.encode())
                digest.update(b.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._projection_key = (seen, digest.hexdigest())
        return self._projection_key[1]

    def forward(self, batch: dict, live: bool = False) -> torch.Tensor:
        """Classification logits (B, n_labels), or for T5 LM logits (B, T_dec, vocab), from
        states as the store holds them, or with `live`, from the backbone's own states (each
        ladder applies the store's width map first: SideStack.live_ladder)."""
        enc = batch["enc"]
        h = self.streams["enc"](
            enc["states"], enc["attention_mask"], live=live, packing=enc.get("packing")
        )
        if self.cfg.family != ENCODER_DECODER:
            return self.head(h, enc["attention_mask"])
        dec = batch["dec"]
        g = self.streams["dec"](
            dec["states"],
            dec["attention_mask"],
            cross=h,
            cross_mask=enc["attention_mask"],
            live=live,
        )
        return (self.upsample(g) * self.lm_scale) @ self.lm_head.T

    def loss(self, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        if self.cfg.family != ENCODER_DECODER:
            return nn.functional.cross_entropy(logits, batch["labels"])
        targets = batch["dec"]["input_ids"].masked_fill(batch["dec"]["attention_mask"] == 0, -100)
        return nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=-100
        )

    def loss_terms(self, batch: dict) -> int:
        """How many terms `loss` averages over: rows, or for T5 the real target tokens (a batch
        split into micro-batches weighs each one's loss by its share of these)."""
        if self.cfg.family != ENCODER_DECODER:
            return len(batch["labels"])
        return int(batch["dec"]["attention_mask"].sum())

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def side_network(cfg: SideConfig) -> SideNetwork:
    """The network a config describes: a classifier (or T5's label writer), or for task
    "generate" a generative one (of T5: the label writer, writing replies)."""
    if cfg.task == "generate" and cfg.family == DECODER:
        from side_trainer.generative import GenerativeSideNetwork

        return GenerativeSideNetwork(cfg)
    return SideNetwork(cfg)


__all__ = [
    "SideConfig",
    "SideNetwork",
    "side_network",
    "additive_mask",
    "ENCODER",
    "DECODER",
    "ENCODER_DECODER",
]

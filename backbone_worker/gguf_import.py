"""Backbones shipped as GGUF files: de-quantise once into a safetensors model directory.

Loading a GGUF file through transformers (`gguf_file=`) de-quantises every tensor, which takes
about 30 s for SmolLM2-135M and needs the `gguf` package. The converted copy lives in the model
cache (`LADDER_MODEL_CACHE`, default `~/.cache/ladder/models`) under the source file's sha256, so a
changed or replaced GGUF file gets a fresh copy and an unchanged one is never converted twice. The
copy is written to a temporary directory and renamed into place whole, so a crash mid-conversion
or two processes converting at once never leave a half-written model behind.

The weights are the de-quantised 4-bit ones (fp32 after conversion), not the original bf16
release: close to it, not equal to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE_FILE = "ladder_source.json"  # written last: a directory without it is incomplete


def model_cache_dir() -> Path:
    return Path(os.environ.get("LADDER_MODEL_CACHE", "~/.cache/ladder/models")).expanduser()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


_digests: dict[tuple, str] = {}  # (path, size, mtime) -> sha256, so a process hashes a file once
_locks: dict[Path, threading.Lock] = {}  # one per target: threads of a process convert once
_locks_guard = threading.Lock()


def converted_dir(gguf_path: Path, name: str, cache: Path | None = None) -> Path:
    """The safetensors copy of `gguf_path`, converting it first if there is none yet."""
    gguf_path = Path(gguf_path)
    stat = gguf_path.stat()
    key = (str(gguf_path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        _digests[key] = file_sha256(gguf_path)
    digest = _digests[key]
    target = (cache or model_cache_dir()) / f"{name}-{digest[:16]}"
    if (target / SOURCE_FILE).is_file():
        return target
    with _locks_guard:
        lock = _locks.setdefault(target, threading.Lock())
    with lock:  # a second caller waits for the first one's copy instead of converting again
        if not (target / SOURCE_FILE).is_file():
            _convert_into(gguf_path, target, digest, name)
    return target


def _convert_into(gguf_path: Path, target: Path, digest: str, name: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        convert(gguf_path, work)
        (work / SOURCE_FILE).write_text(
            json.dumps(
                {
                    "gguf_file": str(gguf_path),
                    "sha256": digest,
                    "note": "de-quantised from this GGUF file; not the original full-precision weights",
                },
                indent=2,
            )
            + "\n"
        )
        try:
            work.rename(target)
        except OSError:
            # Another process finished first (the target exists now); its copy is as good.
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def convert(gguf_path: Path, out_dir: Path) -> None:
    """De-quantise a GGUF checkpoint into `out_dir` (config.json, model.safetensors, tokenizer)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("converting %s to safetensors (once; later loads use the copy)", gguf_path.name)
    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy is plain fp32, not a quantised model
    config.save_pretrained(out_dir)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as the token embeddings
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    tokenizer.save_pretrained(out_dir)
    out_dir.chmod(0o755)  # mkdtemp makes it private; the copy is shared
    for file in out_dir.iterdir():
        file.chmod(0o644)
    log.info("converted %s in %.1fs", gguf_path.name, time.perf_counter() - started)

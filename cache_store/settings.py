"""Store settings and part plan: canonical form, fingerprint, validation and mismatch reports."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cache_store.codecs import DEFAULT_DTYPE, check_dtype

SPLITS = ("train", "validation", "test")


def canonical(value: Any) -> Any:
    """The value as it comes back from the store's JSON attributes (tuples become lists, ...)."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise ValueError(f"store settings and plan must be JSON-serialisable: {e}") from e


def fingerprint(settings: dict) -> str:
    """sha256 hex of the canonical JSON (json.dumps with sort_keys=True) of the settings."""
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def state_dtype(settings: dict) -> str:
    return check_dtype(settings.get("dtype", DEFAULT_DTYPE))


def validate_plan(plan: list[dict]) -> None:
    """Parts must be numbered 0..P-1 in order, each with a known split and n >= 1 examples."""
    for position, part in enumerate(plan):
        if part.get("index") != position:
            raise ValueError(
                f"plan entry {position} has index {part.get('index')!r}; "
                f"parts must be numbered 0..{len(plan) - 1} in order"
            )
        if part.get("split") not in SPLITS:
            raise ValueError(
                f"plan part {position} has split {part.get('split')!r}; "
                f"use one of {', '.join(SPLITS)}"
            )
        n = part.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"plan part {position} has n={n!r}; it must be an integer >= 1")


def differences(stored: dict, requested: dict) -> list[str]:
    """One 'field: stored X, requested Y' entry per settings field that differs."""
    missing = "<absent>"
    out = []
    for key in sorted(set(stored) | set(requested)):
        old, new = stored.get(key, missing), requested.get(key, missing)
        if old != new:
            out.append(f"{key}: stored {_short(old)}, requested {_short(new)}")
    return out


def _short(value: Any, limit: int = 80) -> str:
    # Some settings (a backbone's whole config) are large; keep the error message one short line.
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."

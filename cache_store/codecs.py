"""Stored dtypes for ladder states: fp16, bf16 (as uint16 bits) and int8 with a per-token scale
and each token's largest few channels kept apart in bf16.

All encoders take float32 states of shape (T, d) and all decoders return float32 (T, d).

Why int8 keeps outliers apart: a per-token scale follows the token's largest channel, and
transformers write a few tokens (decoder-only models' attention sinks, BERT's [CLS]) with one
channel hundreds of times the rest (SmolLM2: 27,000 against a median near 50). With one scale for
the row, every other channel of such a token rounds to 0 or 1 step: 43% error on them (measured
on SmolLM2's full-width states, bench/int8_outliers.py). Keeping each token's INT8_OUTLIERS
largest channels in bf16 (exact to bf16's 3 digits, with float32's range) and scaling the rest by
their own maximum takes that to 3%, and the mean error over all tokens down 2-3x, for 4 bytes per
outlier per token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from cache_store.errors import StateRangeError

DTYPES = ("fp16", "bf16", "int8")
DEFAULT_DTYPE = "fp16"

# NaN -> a quiet bf16 NaN (c10's scalar pattern); torch's vectorised CPU path writes 0xFFFF
# instead, so NaN bits vary by backend while every finite value and inf match bit for bit.
_BF16_NAN = np.uint16(0x7FC0)


# Channels per token an int8 store keeps apart (stores written before record none: 0).
INT8_OUTLIERS = 2


@dataclass(frozen=True)
class Encoded:
    """A state's stored arrays, all with the token rows first: (T, ...) for a part's stream, or
    (B, T, ...) for a padded batch."""

    values: np.ndarray  # (T, d): float16 | uint16 (bf16 bits) | int8
    scales: np.ndarray | None = None  # (T,) float32 per-token scale; int8 only
    outlier_index: np.ndarray | None = None  # (T, k) int16 channels kept apart; int8 only
    outlier_values: np.ndarray | None = None  # (T, k) uint16 bf16 bits of those channels

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays this state has, by field name (what the store writes and reads)."""
        return {f.name: a for f in fields(self) if (a := getattr(self, f.name)) is not None}

    def map(self, fn) -> Encoded:
        """The same state with fn(array) in place of each array (slicing, gathering, copying)."""
        return replace(self, **{name: fn(a) for name, a in self.arrays().items()})


# A state's arrays in the store: <stream>/<ARRAY_DIRS[field]>/<state name>.
ARRAY_DIRS = {
    "values": "states",
    "scales": "scales",
    "outlier_index": "outlier_index",
    "outlier_values": "outlier_values",
}


def stored_fields(dtype: str, outliers: int) -> tuple[str, ...]:
    """The Encoded fields a store of `dtype` keeping `outliers` channels apart writes."""
    if dtype != "int8":
        return ("values",)
    return ("values", "scales") + (("outlier_index", "outlier_values") if outliers else ())


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"unknown state dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return dtype


def bytes_per_element(dtype: str, d: int, outliers: int = 0) -> float:
    """Stored bytes per state element before compression; int8 pays a float32 scale per token,
    i.e. 4/d bytes per element on top of its 1 byte, and 4 bytes (int16 channel, bf16 value)
    per outlier kept apart."""
    check_dtype(dtype)
    if dtype == "int8":
        return 1.0 + (4.0 + 4.0 * outliers) / d
    return 2.0


def encode(x: np.ndarray, dtype: str, outliers: int = 0) -> Encoded:
    """`x` (T, d) float32 in `dtype`; int8 keeps each token's `outliers` largest channels apart.
    Non-finite values are a StateRangeError (no dtype would keep them: int8 would turn a row
    with one inf into NaN, fp16's range check could not tell overflow from what came in)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"ladder states must be 2-D (tokens, d), got shape {x.shape}")
    check_dtype(dtype)
    check_finite(x)
    if dtype == "fp16":
        values = x.astype(np.float16)
        if np.isinf(values).any():
            raise StateRangeError(
                f"a value of {float(np.abs(x).max()):.4g} exceeds fp16's range (65,504) and would "
                f"be stored as inf",
                "cache with {setting} bf16 instead (the same size, with float32's range)",
                setting="CacheOptions.dtype",
            )
        return Encoded(values, None)
    if dtype == "bf16":
        return Encoded(bf16_bits(x))
    return _int8(x, outliers)


NON_FINITE_FIX = (
    "check the backbone's weights, or run it in float32 (a half-precision forward can overflow)"
)


def first_non_finite(x: np.ndarray) -> tuple[int, str] | None:
    """(the first row of `x` holding a NaN or an infinity, "NaN" or "an infinity"), or None."""
    finite = np.isfinite(x)
    if finite.all():
        return None
    row = int(np.flatnonzero(~finite.all(axis=1))[0])
    return row, "NaN" if np.isnan(x[row]).any() else "an infinity"


def check_finite(x: np.ndarray) -> None:
    """StateRangeError naming the first token (row) of `x` with a NaN or an infinity."""
    if (bad := first_non_finite(x)) is not None:
        raise StateRangeError(
            f"token {bad[0]} holds {bad[1]}: the backbone produced non-finite states",
            NON_FINITE_FIX,
        )


def decode(enc: Encoded, dtype: str) -> np.ndarray:
    return decode_tensor(enc, dtype).numpy()


def decode_tensor(enc: Encoded, dtype: str, device=None):
    """float32 torch tensor of the values' shape ((T, d), or (B, T, d) with (B, T) scales, a
    strided view being read in place), decoded on `device` (default: the CPU), which receives
    the stored 1-2 byte values; torch's vectorised casts are several times faster than numpy's
    float16 -> float32 on CPUs (this is the training read path's hot spot)."""
    import torch  # here, so the module's option lists load without torch

    check_dtype(dtype)

    def put(array: np.ndarray):
        tensor = torch.from_numpy(array)
        return tensor if device is None else tensor.to(device)

    if dtype == "fp16":
        return put(enc.values).float()
    if dtype == "bf16":
        # bf16 is the top half of a float32: reinterpreting the bits is exact.
        return put(enc.values.view(np.int16)).view(torch.bfloat16).float()
    if enc.scales is None:
        raise ValueError("int8 states need their per-token scales to decode")
    out = put(enc.values).float().mul_(put(enc.scales).unsqueeze(-1))
    if enc.outlier_index is not None:
        kept = put(enc.outlier_values.view(np.int16)).view(torch.bfloat16).float()
        out.scatter_(-1, put(enc.outlier_index).long(), kept)
    return out


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits with round-to-nearest-even, bit-identical to torch's conversion."""
    bits = x.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds half to even; overflow only affects NaN
    # payloads, which are replaced below (finite values round up to inf correctly).
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    out = rounded.astype(np.uint16)
    out[np.isnan(x)] = _BF16_NAN
    return out


def _int8(x: np.ndarray, outliers: int = 0) -> Encoded:
    """Symmetric per-token quantisation: scale = max|x_row| / 127, q = round(x / scale).
    Error per element is at most scale / 2 (plus float32 rounding of the product on decode).
    All-zero rows get scale 0 and decode to exactly zero. With `outliers` = k, each row's k
    largest |x| channels are stored apart (bf16) and the scale follows the rest."""
    index = kept = None
    if outliers:
        d = x.shape[1]
        if d > np.iinfo(np.int16).max:
            raise ValueError(f"int8 outlier channels are stored as int16: width {d} is too wide")
        k = min(outliers, d)
        index = np.argpartition(-np.abs(x), k - 1, axis=1)[:, :k]  # (T, k)
        index.sort(axis=1)  # channel order: compresses better, decodes the same
        kept = bf16_bits(np.take_along_axis(x, index, axis=1))
        x = x.copy()
        np.put_along_axis(x, index, 0.0, axis=1)
        index = index.astype(np.int16)
    scales = (np.abs(x).max(axis=1, initial=0.0) / 127.0).astype(np.float32)  # (T,)
    # Divide in float64 by the stored float32 scale, so rounding is against what decode uses.
    safe = np.where(scales > 0, scales, 1.0).astype(np.float64)[:, None]
    q = np.clip(np.rint(x.astype(np.float64) / safe), -127, 127).astype(np.int8)  # (T, d)
    return Encoded(q, scales, index, kept)

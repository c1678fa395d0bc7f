"""Stored dtypes for ladder states: fp16, bf16 (as uint16 bits) and int8 with a per-token scale.

All encoders take float32 states of shape (T, d) and all decoders return float32 (T, d).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cache_store.errors import StateRangeError

DTYPES = ("fp16", "bf16", "int8")
DEFAULT_DTYPE = "fp16"

# NaN -> a quiet bf16 NaN (c10's scalar pattern); torch's vectorised CPU path writes 0xFFFF
# instead, so NaN bits vary by backend while every finite value and inf match bit for bit.
_BF16_NAN = np.uint16(0x7FC0)


@dataclass(frozen=True)
class Encoded:
    values: np.ndarray  # (T, d): float16 | uint16 (bf16 bits) | int8
    scales: np.ndarray | None  # (T,) float32 per-token scale; int8 only


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"unknown state dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return dtype


def bytes_per_element(dtype: str, d: int) -> float:
    """Stored bytes per state element before compression; int8 pays a float32 scale per token,
    i.e. 4/d bytes per element on top of its 1 byte."""
    check_dtype(dtype)
    if dtype == "int8":
        return 1.0 + 4.0 / d
    return 2.0


def encode(x: np.ndarray, dtype: str) -> Encoded:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"ladder states must be 2-D (tokens, d), got shape {x.shape}")
    check_dtype(dtype)
    if dtype == "fp16":
        values = x.astype(np.float16)
        if np.isinf(values).any() and np.isfinite(x).all():
            raise StateRangeError(
                f"a value of {float(np.abs(x).max()):.4g} exceeds fp16's range (65,504) and would "
                f"be stored as inf",
                "cache with {setting} bf16 instead (the same size, with float32's range)",
                setting="CacheOptions.dtype",
            )
        return Encoded(values, None)
    if dtype == "bf16":
        return Encoded(_bf16_bits(x), None)
    return _int8(x)


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
    return put(enc.values).float().mul_(put(enc.scales).unsqueeze(-1))


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits with round-to-nearest-even, bit-identical to torch's conversion."""
    bits = x.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds half to even; overflow only affects NaN
    # payloads, which are replaced below (finite values round up to inf correctly).
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    out = rounded.astype(np.uint16)
    out[np.isnan(x)] = _BF16_NAN
    return out


def _int8(x: np.ndarray) -> Encoded:
    """Symmetric per-token quantisation: scale = max|x_row| / 127, q = round(x / scale).
    Error per element is at most scale / 2 (plus float32 rounding of the product on decode).
    All-zero rows get scale 0 and decode to exactly zero."""
    scales = (np.abs(x).max(axis=1, initial=0.0) / 127.0).astype(np.float32)  # (T,)
    # Divide in float64 by the stored float32 scale, so rounding is against what decode uses.
    safe = np.where(scales > 0, scales, 1.0).astype(np.float64)[:, None]
    q = np.clip(np.rint(x.astype(np.float64) / safe), -127, 127).astype(np.int8)  # (T, d)
    return Encoded(q, scales)

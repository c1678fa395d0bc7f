"""Stored width: a fixed linear map from a backbone state's width d to K < d, chosen when a store
is created and applied to every state before it is written, so the store holds K numbers per
token and state instead of d. Joint inference applies the same map to live states (the side
model carries the matrices), so a side network never sees anything else.

Kinds:
- "pca": the top-K eigenvectors of the states' second-moment matrix, fitted per state on a
  sample of training tokens (the directions that carry the most of the states' energy);
- "pool": the mean of each group of d/K consecutive channels (nothing to fit).
With `normalize`, each token's state is RMS-normalised before the map (decoder-only backbones,
whose residual streams carry a few massive activations that would otherwise own the top
components); the side network then applies no normalisation of its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

KINDS = ("pca", "pool")


@dataclass(frozen=True)
class ProjectionSpec:
    kind: str  # pca | pool
    width: int  # K, the stored width
    normalize: bool  # RMS-normalise each token before the map

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown projection {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.width < 1:
            raise ValueError(f"the stored width must be at least 1, got {self.width}")

    def as_dict(self) -> dict:
        return asdict(self)

    def check_width(self, d: int) -> None:
        if self.width >= d:
            raise ValueError(
                f"stored width {self.width} is not below the state width {d}; pick "
                f"a smaller width, or store full width"
            )
        if self.kind == "pool" and d % self.width:
            raise ValueError(
                f"pooled width {self.width} does not divide the state width {d}; "
                f"pick a divisor of {d}"
            )


def rms_normalize(x: np.ndarray) -> np.ndarray:
    """(T, d) -> (T, d) float32, each row divided by its root mean square (eps 1e-6)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.sqrt(
        np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True) + 1e-6
    ).astype(np.float32)


def fit(spec: ProjectionSpec, samples: np.ndarray) -> np.ndarray:
    """The (d, K) float32 matrix of one state, from a sample of its tokens (N, d)."""
    samples = np.asarray(samples, dtype=np.float32)
    d = samples.shape[1]
    spec.check_width(d)
    if spec.kind == "pool":
        group = d // spec.width
        matrix = np.zeros((d, spec.width), dtype=np.float32)
        matrix[np.arange(d), np.arange(d) // group] = 1.0 / group
        return matrix
    if spec.normalize:
        samples = rms_normalize(samples)
    moment = samples.T.astype(np.float64) @ samples.astype(np.float64) / max(len(samples), 1)
    values, vectors = np.linalg.eigh(moment)  # ascending eigenvalues
    top = vectors[:, np.argsort(values)[::-1][: spec.width]]  # (d, K)
    return np.ascontiguousarray(top, dtype=np.float32)


def apply(spec: ProjectionSpec, matrix: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(T, d) -> (T, K) float32."""
    if spec.normalize:
        x = rms_normalize(x)
    return np.asarray(x, dtype=np.float32) @ matrix

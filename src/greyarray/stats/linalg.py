"""Small linear-algebra helpers every model shares (lm, GAM, permutations)."""

from __future__ import annotations

import numpy as np


def column_norms(x: np.ndarray) -> np.ndarray:
    """Euclidean norms of the design columns over the rows axis (-2): (..., n, p) -> (..., p),
    scaled first so that a covariate near float64's limit (1e300) is not squared to inf (as
    LAPACK's dnrm2 avoids): an inf norm would make R's rank test fail every element."""
    scale = np.abs(x).max(axis=-2, keepdims=True)
    scale[scale == 0] = 1
    return scale[..., 0, :] * np.sqrt(((x / scale) ** 2).sum(axis=-2))

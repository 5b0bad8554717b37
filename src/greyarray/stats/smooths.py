"""mgcv's smooth bases for one covariate, built as mgcv 1.8-41 builds them.

``tp`` (thin plate regression spline, ``smooth.construct.tp.smooth.spec`` and C
``tprs_setup``), ``cr`` (cubic regression spline, C ``crspl``/``getFS``), and their shrinkage
versions ``ts``/``cs``; then ``smoothCon``'s penalty rescaling and sum-to-zero constraint.

Why so literal: ``summary.gam``'s smooth test statistic is not invariant to the choice of basis
of the smooth (it averages two quadratic forms whose roles depend on eigenvector signs in that
basis), so the basis must equal mgcv's up to column signs: same eigenvector order, same
Householder conventions (mgcv's ``QT``/``HQmult``, LINPACK's ``dqrdc2``), same rescalings. Every
step below is sign-equivariant, so eigenvector signs (arbitrary in mgcv's Lanczos too) cancel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import linalg
from scipy.sparse import linalg as sparse_linalg

from greyarray.errors import DataError

BASES = ("tp", "ts", "cr", "cs")
MAX_KNOTS = 2000  # mgcv's default xt$max.knots for tp
SHRINK = 0.1  # mgcv's shrinkage factor for ts/cs


@dataclass(frozen=True)
class Smooth:
    """One smooth term's columns and penalty after mgcv's constraint absorption."""

    X: np.ndarray  # (n, k - 1)
    deriv: np.ndarray  # (n, k - 1): d/dx of the columns at the data
    S: np.ndarray | None  # (k - 1, k - 1), scaled as smoothCon scales it; None when fx=TRUE
    shrink: bool  # ts/cs: no penalty null space, so summary.gam tests them with reTest


def r_mean(x: np.ndarray) -> float:
    """R's ``mean``: long double sum, then one refinement pass."""
    xl = np.asarray(x, dtype=np.longdouble)
    n = xl.size
    s = np.cumsum(xl)[-1] / n
    t = np.cumsum(xl - s)[-1]
    return float(s + t / n)


def r_col_means(X: np.ndarray) -> np.ndarray:
    """R's ``colMeans``: sequential long double sums."""
    return (np.cumsum(X.astype(np.longdouble), axis=0)[-1] / X.shape[0]).astype(np.float64)


def r_quantile7(x: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """R's ``quantile(x, probs)`` (type 7), same operations."""
    xs = np.sort(x)
    n = xs.size
    index = 1 + (n - 1) * probs
    lo = np.floor(index).astype(int)
    hi = np.ceil(index).astype(int)
    qs = xs[lo - 1].copy()
    h = index - lo
    interp = (index > lo) & (xs[hi - 1] != qs)
    qs[interp] = (1 - h[interp]) * qs[interp] + h[interp] * xs[hi[interp] - 1]
    return qs


def r_seq01(length: int) -> np.ndarray:
    """R's ``seq(0, 1, length = n)``."""
    by = 1.0 / (length - 1)
    return np.array([0.0] + [i * by for i in range(1, length - 1)] + [1.0])


# --- thin plate regression splines -----------------------------------------------------------


def _eta_const_1d() -> float:
    """mgcv's ``eta_const(m=2, d=1)`` (= 1/12), same operations."""
    ghalf = math.sqrt(math.asin(1.0) * 2)
    f = ghalf
    for i in range(2):
        f /= -0.5 - i
    for _ in range(2):
        f /= 4
    return f / ghalf


def qt_householder(A: np.ndarray) -> np.ndarray:
    """mgcv's ``QT(Q, A, 0)``: Householder vectors (rows) with A Q = [0, T]."""
    A = A.copy()
    rows, cols = A.shape
    U = np.zeros_like(A)
    for i in range(rows):
        end = cols - i
        p = A[i, :end]
        m = np.abs(p).max()
        if m:
            p /= m
        lsq = math.sqrt(float(np.sum(p * p)))
        if p[end - 1] < 0.0:
            lsq = -lsq
        p[end - 1] += lsq
        g = 1 / (lsq * p[end - 1]) if lsq else 0.0
        for j in range(i + 1, rows):
            A[j, :end] -= (g * (p @ A[j, :end])) * p
        U[i, :end] = p * math.sqrt(g)
    return U


def _post_multiply_q(C: np.ndarray, U: np.ndarray) -> np.ndarray:
    """mgcv's ``HQmult(C, U, 0, 0)``: C Q."""
    C = C.copy()
    for u in U:
        C -= np.outer(C @ u, u)
    return C


def _pre_multiply_qt(C: np.ndarray, U: np.ndarray) -> np.ndarray:
    """mgcv's ``HQmult(C, U, 1, 1)``: Q' C."""
    C = C.copy()
    for u in U:
        C -= np.outer(u, u @ C)
    return C


def _largest_magnitude_eigen(E: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k eigenvalues of largest magnitude (and vectors), in decreasing order of value, as
    mgcv's ``Rlanczos(..., lm = -1)`` returns them."""
    try:
        if E.shape[0] <= 4 * k + 20:
            raise ValueError("small: full decomposition")
        start = np.random.default_rng(0).uniform(-0.5, 0.5, E.shape[0])
        # Lanczos (ARPACK), as mgcv uses Lanczos: O(n^2 k), not O(n^3)
        values, vectors = sparse_linalg.eigsh(E, k=k, which="LM", tol=0, v0=start)
    except (ValueError, sparse_linalg.ArpackError):
        values, vectors = np.linalg.eigh(E)
    pick = np.sort(np.argsort(-np.abs(values), kind="stable")[:k])[::-1]
    return values[pick], vectors[:, pick]


def tprs(x: np.ndarray, k: int, penalised: bool, shrink: bool):
    """Model matrix (n, k), its derivative in x and penalty (k, k) of ``s(x, bs="tp"|"ts")``."""
    xx = x - r_mean(x)
    knots, index = np.unique(xx, return_inverse=True)
    if knots.size > MAX_KNOTS:
        raise DataError(
            f"{knots.size} distinct covariate values: mgcv subsamples {MAX_KNOTS} knots at "
            "random for a thin plate spline, which GreyArray does not reproduce; use bs='cr'"
        )
    if knots.size <= k:
        raise DataError(
            f"a tp smooth with k={k} needs more than {k} distinct covariate values "
            f"(found {knots.size})"
        )
    M = 2
    d2 = (knots[:, None] - knots[None, :]) ** 2
    E = _eta_const_1d() * d2 * np.sqrt(d2)
    T = np.column_stack([np.ones_like(knots), knots])
    v, U = _largest_magnitude_eigen(E, k)
    Z = qt_householder(T.T @ U)
    X1 = _post_multiply_q(U * v, Z)
    X1[:, k - M :] = T
    X = X1[index]
    diff = knots[:, None] - knots[None, :]  # d/dx of eta0 |x - knot|^3 at the knots
    dX1 = (3 * _eta_const_1d() * diff * np.abs(diff)) @ _post_multiply_q(U, Z)
    dX1[:, k - M :] = [0.0, 1.0]
    dX = dX1[index]
    S = _pre_multiply_qt(_post_multiply_q(np.diag(v), Z), Z)
    S[:, k - M :] = 0.0
    S[k - M :, :] = 0.0
    w = np.sqrt((X * X).sum(axis=0) / X.shape[0])
    X, dX = X / w, dX / w
    S = S / w[:, None] / w[None, :]
    S = (S + S.T) / 2
    if penalised and shrink:
        values, vectors = np.linalg.eigh(S)
        values, vectors = values[::-1], vectors[:, ::-1]
        values[k - M :] = values[k - M - 1] * SHRINK
        S = (vectors * values) @ vectors.T
    return X, dX, S


# --- cubic regression splines ----------------------------------------------------------------


def _cr_maps(knots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mgcv's ``getFS``: G maps values at knots to second derivatives; S = D'B^-1 D."""
    nk = knots.size
    h = np.diff(knots)
    D = np.zeros((nk - 2, nk))
    for i in range(nk - 2):
        D[i, i] = 1 / h[i]
        D[i, i + 2] = 1 / h[i + 1]
        D[i, i + 1] = -D[i, i] - D[i, i + 2]
    B = np.diag((h[:-1] + h[1:]) / 3) + np.diag(h[1:-1] / 6, 1) + np.diag(h[1:-1] / 6, -1)
    BinvD = np.linalg.solve(B, D)
    G = np.zeros((nk, nk))
    G[1:-1] = BinvD
    return G, D.T @ BinvD


def crspl(x: np.ndarray, k: int, penalised: bool, shrink: bool):
    """Model matrix (n, k), its derivative in x and penalty (k, k) of ``s(x, bs="cr"|"cs")``."""
    unique = np.unique(x)
    if unique.size < k:
        raise DataError(f"a cr smooth with k={k} needs {k} distinct covariate values")
    knots = r_quantile7(unique, r_seq01(k))
    G, S = _cr_maps(knots)
    j = np.clip(np.searchsorted(knots, x, side="left") - 1, 0, k - 2)
    h = knots[j + 1] - knots[j]
    ajm = knots[j + 1] - x
    ajp = x - knots[j]
    cjm = (ajm * (ajm * ajm / h - h)) / 6
    cjp = (ajp * (ajp * ajp / h - h)) / 6
    X = cjm[:, None] * G[j] + cjp[:, None] * G[j + 1]
    dcjm = -(3 * ajm * ajm / h - h) / 6
    dcjp = (3 * ajp * ajp / h - h) / 6
    dX = dcjm[:, None] * G[j] + dcjp[:, None] * G[j + 1]
    rows = np.arange(x.size)
    X[rows, j] += ajm / h
    X[rows, j + 1] += ajp / h
    dX[rows, j] -= 1 / h
    dX[rows, j + 1] += 1 / h
    S = (S + S.T) / 2
    if penalised and shrink:
        values, vectors = linalg.eigh(S, driver="evr")  # R's eigen() uses LAPACK dsyevr
        values, vectors = values[::-1].copy(), vectors[:, ::-1]
        values[k - 2] = values[k - 3] * SHRINK
        values[k - 1] = values[k - 2] * SHRINK
        S = (vectors * values) @ vectors.T
    return X, dX, S


# --- smoothCon -------------------------------------------------------------------------------


def absorb_sum_to_zero(X: np.ndarray, dX: np.ndarray, S: np.ndarray | None):
    """smoothCon's constraint colMeans(X) b = 0 absorbed through LINPACK's Householder QR of
    t(C) (``qr``/``qr.qty``): keep rows 2..k of Q' (applied to X, its derivative and S)."""
    c = r_col_means(X)
    norm = math.sqrt(float(c @ c))
    if c[0] != 0.0:
        norm = math.copysign(norm, c[0])
    u = c / norm
    u[0] += 1.0

    def qty(A: np.ndarray) -> np.ndarray:  # Q'A for A with k rows
        return A - np.outer(u, (u @ A) / u[0])

    Sc = None if S is None else qty(qty(S)[1:].T)[1:].T
    return qty(X.T)[1:].T, qty(dX.T)[1:].T, Sc


def scale_penalty(X: np.ndarray, S: np.ndarray) -> np.ndarray:
    """smoothCon's rescaling: S / (norm(S, "O") / norm(X, "I")^2)."""
    ma_xx = np.abs(X).sum(axis=1).max() ** 2
    ma_s = np.abs(S).sum(axis=0).max() / ma_xx
    return S / ma_s


def smooth_term(x: np.ndarray, bs: str, k: int, fx: bool) -> Smooth:
    """The constrained columns and scaled penalty of ``s(x, bs=bs, k=k, fx=fx)``."""
    if bs in ("tp", "ts"):
        X, dX, S = tprs(x, k, not fx, bs == "ts")
    else:
        X, dX, S = crspl(x, k, not fx, bs == "cs")
    S = None if fx else scale_penalty(X, S)
    Xc, dXc, Sc = absorb_sum_to_zero(X, dX, S)
    return Smooth(Xc, dXc, Sc, bs in ("ts", "cs"))

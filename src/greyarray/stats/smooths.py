"""mgcv's smooths, built as mgcv 1.8-41 builds them.

``tp`` (thin plate regression spline, ``smooth.construct.tp.smooth.spec`` and C
``tprs_setup``), ``cr`` (cubic regression spline, C ``crspl``/``getFS``), and their shrinkage
versions ``ts``/``cs``; then ``smoothCon``'s penalty rescaling and sum-to-zero constraint, its
factor ``by=`` (one smooth per level), and the tensor products ``te``/``ti`` of such margins
(``smooth.construct.tensor.smooth.spec``).

Why so literal: ``summary.gam``'s smooth test statistic is not invariant to the choice of basis
of the smooth (it averages two quadratic forms whose roles depend on eigenvector signs in that
basis), so the basis must equal mgcv's up to column signs: same eigenvector order, same
Householder conventions (mgcv's ``QT``/``HQmult``, LINPACK's ``dqrdc2``), same rescalings. Every
step below is sign-equivariant, so eigenvector signs (arbitrary in mgcv's Lanczos too) cancel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import linalg
from scipy.sparse import linalg as sparse_linalg

from greyarray.errors import DataError

EPS = np.finfo(float).eps

BASES = ("tp", "ts", "cr", "cs")
MAX_KNOTS = 2000  # mgcv's default xt$max.knots for tp
SHRINK = 0.1  # mgcv's shrinkage factor for ts/cs


@dataclass(frozen=True)
class Basis:
    """A basis as mgcv's ``smooth.construct`` returns it (before ``smoothCon``)."""

    X: np.ndarray  # (n, k)
    dX: np.ndarray  # (n, k): d/dx of the columns at the data
    S: np.ndarray  # (k, k), unscaled
    null_space_dim: int  # 0 for the shrinkage bases ts/cs
    predict: Callable[[np.ndarray], np.ndarray] | None  # columns at new x; None: mgcv's noterp


@dataclass(frozen=True)
class Smooth:
    """One smooth as ``gam`` fits it (a factor ``by`` gives one per level): its columns and
    penalties after smoothCon's scaling and constraint absorption."""

    X: np.ndarray  # (n, q)
    deriv: np.ndarray | None  # (n, q): d/dx of the columns at the data (one covariate only)
    S: tuple[np.ndarray, ...]  # (q, q) each, scaled as smoothCon scales them; () when fx=TRUE
    null_space_dim: int  # mgcv's null.space.dim: penalised and 0 means summary.gam's reTest


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


def r_seq(start: float, stop: float, length: int) -> np.ndarray:
    """R's ``seq(start, stop, length = n)``."""
    by = (stop - start) / (length - 1)
    return np.array([start] + [start + i * by for i in range(1, length - 1)] + [stop])


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


def tprs(x: np.ndarray, k: int, penalised: bool, shrink: bool) -> Basis:
    """Model matrix (n, k), its derivative in x and penalty (k, k) of ``s(x, bs="tp"|"ts")``."""
    shift = r_mean(x)
    xx = x - shift
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

    def predict(at: np.ndarray) -> np.ndarray:
        """``Predict.matrix.tprs.smooth``: the columns at new covariate values."""
        at = at - shift
        d = np.abs(at[:, None] - knots[None, :])
        P = _post_multiply_q((_eta_const_1d() * d**3) @ U, Z)
        P[:, k - M :] = np.column_stack([np.ones_like(at), at])
        return P / w

    return Basis(X, dX, S, 0 if shrink else M, predict)


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


def crspl(x: np.ndarray, k: int, penalised: bool, shrink: bool) -> Basis:
    """Model matrix (n, k), its derivative in x and penalty (k, k) of ``s(x, bs="cr"|"cs")``."""
    unique = np.unique(x)
    if unique.size < k:
        raise DataError(f"a cr smooth with k={k} needs {k} distinct covariate values")
    knots = r_quantile7(unique, r_seq(0.0, 1.0, k))
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
    return Basis(X, dX, S, 0 if shrink else 2, None)  # cr: mgcv's noterp (no np reparameter)


# --- smoothCon -------------------------------------------------------------------------------


def sum_to_zero(X: np.ndarray):
    """smoothCon's constraint colMeans(X) b = 0 absorbed through LINPACK's Householder QR of
    t(C) (``qr``/``qr.qty``): with Z = rows 2..k of Q', returns A -> A Z (for the columns and
    their derivative) and S -> Z'SZ (for a penalty)."""
    c = r_col_means(X)
    norm = math.sqrt(float(c @ c))
    if c[0] != 0.0:
        norm = math.copysign(norm, c[0])
    u = c / norm
    u[0] += 1.0

    def qty(A: np.ndarray) -> np.ndarray:  # Q'A for A with k rows
        return A - np.outer(u, (u @ A) / u[0])

    def columns(A: np.ndarray) -> np.ndarray:
        return qty(A.T)[1:].T

    def penalty(S: np.ndarray) -> np.ndarray:
        return qty(qty(S)[1:].T)[1:].T

    return columns, penalty


def scale_penalty(X: np.ndarray, S: np.ndarray) -> np.ndarray:
    """smoothCon's rescaling: S / (norm(S, "O") / norm(X, "I")^2)."""
    ma_xx = np.abs(X).sum(axis=1).max() ** 2
    ma_s = np.abs(S).sum(axis=0).max() / ma_xx
    return S / ma_s


def basis(x: np.ndarray, bs: str, k: int, penalised: bool) -> Basis:
    """``smooth.construct`` of a one-covariate basis."""
    if bs in ("tp", "ts"):
        return tprs(x, k, penalised, bs == "ts")
    return crspl(x, k, penalised, bs == "cs")


def smooth_term(
    x: np.ndarray, bs: str, k: int, fx: bool, by: tuple[np.ndarray, list[str], bool] | None = None
) -> list[Smooth]:
    """``s(x, bs=bs, k=k, fx=fx)``; with ``by = (codes, levels, ordered)`` (a factor: codes
    index levels) one smooth per level, the level's dummy times the columns, every level under
    the constraint of the whole data's columns; an ordered factor's first level gets none
    (mgcv's smoothCon)."""
    b = basis(x, bs, k, not fx)
    columns, penalty = sum_to_zero(b.X)
    S = () if fx else (penalty(scale_penalty(b.X, b.S)),)
    null = max(0, b.null_space_dim - 1)
    if by is None:
        return [Smooth(columns(b.X), columns(b.dX), S, null)]
    codes, levels, ordered = by
    smooths = []
    for j in range(len(levels)):
        if ordered and j == 0 and len(levels) > 1:
            continue
        dummy = (codes == j).astype(np.float64)[:, None]
        smooths.append(Smooth(columns(dummy * b.X), columns(dummy * b.dX), S, null))
    return smooths


def _row_kronecker(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``tensor.prod.model.matrix``: row-wise Kronecker product, A's columns outermost."""
    return (A[:, :, None] * B[:, None, :]).reshape(A.shape[0], -1)


def tensor_term(
    xs: list[np.ndarray], bs: list[str], ks: list[int], fx: bool, interaction: bool
) -> Smooth:
    """``te(x, z, ...)`` or (``interaction``) ``ti(...)``: mgcv's
    ``smooth.construct.tensor.smooth.spec`` then smoothCon. Margins are built unconstrained (te)
    or through smoothCon with their sum-to-zero constraint (ti's marginal-removal constraints);
    bases other than cr are re-parameterised to their values at evenly spaced points (np =
    TRUE); each margin's penalty is divided by its largest eigenvalue; the columns are the
    row-wise Kronecker product, with one penalty per margin (S_1 x I, I x S_2, ...); te alone
    gets the sum-to-zero constraint of the whole term."""
    Xm, dXm, Sm, nulls = [], [], [], 1
    for x, b_s, k in zip(xs, bs, ks, strict=True):
        b = basis(x, b_s, k, True)
        X, dX, S, predict, null = b.X, b.dX, b.S, b.predict, b.null_space_dim
        if interaction:
            columns, penalty = sum_to_zero(X)
            X, dX, S = columns(X), columns(dX), penalty(scale_penalty(X, S))
            null = max(0, null - 1)
            if predict is not None:
                predict = _then(predict, columns)
        if predict is not None:
            at = r_seq(float(x.min()), float(x.max()), X.shape[1])
            u, d, vt = np.linalg.svd(predict(at))
            if d[-1] / d[0] >= EPS**0.66:  # else mgcv warns and leaves the margin as it is
                XP = vt.T @ (u.T / d[:, None])
                X, dX, S = X @ XP, dX @ XP, (XP.T @ S) @ XP
        Xm.append(X)
        dXm.append(dX)
        Sm.append(S / np.linalg.eigvalsh(S)[-1])
        nulls *= null
    X = Xm[0]
    for A in Xm[1:]:
        X = _row_kronecker(X, A)
    S = () if fx else tuple(scale_penalty(X, P) for P in _tensor_penalties(Sm))
    deriv = dXm[0] if len(xs) == 1 else None
    if not interaction:
        columns, penalty = sum_to_zero(X)
        X, S = columns(X), tuple(penalty(P) for P in S)
        deriv = None if deriv is None else columns(deriv)
    return Smooth(X, deriv, S, nulls)


def _then(first: Callable, second: Callable) -> Callable:
    return lambda at: second(first(at))


def _tensor_penalties(Sm: list[np.ndarray]) -> list[np.ndarray]:
    """``tensor.prod.penalties``: S_i in the i-th place of a Kronecker product of identities."""
    if len(Sm) == 1:
        return [Sm[0]]
    out = []
    for i in range(len(Sm)):
        M = Sm[0] if i == 0 else np.eye(Sm[0].shape[0])
        for j in range(1, len(Sm)):
            M = np.kron(M, Sm[j] if i == j else np.eye(Sm[j].shape[0]))
        out.append((M + M.T) / 2)
    return out

"""The estimation of fit-lmm: lme4's profiled deviance, optimised for many elements at once, and
lmerTest's Satterthwaite degrees of freedom.

lme4's split (Bates et al. 2015, JSS 67(1), section 3) is followed: the random-effects structure
gives Z and the relative covariance factor Lambda(theta) (one lower-triangular q x q block T per
term and level, theta its lower triangle column by column, diagonal bounded below by 0); for a
theta, the penalised least squares problem gives L_theta (L L' = Lambda'Z'Z Lambda + I), R_X, the
conditional estimates and the penalised residual sum r^2, and the profiled criterion is what
lme4's C++ ``lmerResp::Laplace`` returns::

    ML:   log|L|^2 + n (1 + log(2 pi r^2 / n))
    REML: log|L|^2 + log|R_X|^2 + (n - p) (1 + log(2 pi r^2 / (n - p)))

Every element shares X, Z and the grouping, so the criterion is written through cross products
that are computed once per set of valid observations. With W = Lambda M^-1 Lambda' (M = L L'),
X'V^-1 X, X'V^-1 y and y'V^-1 y (V the marginal covariance over sigma^2) are
``G = X'X - B'WB``, ``h = X'y - B'Wc``, ``s = y'y - c'Wc`` (B = Z'X, c = Z'y); then
beta = G^-1 h, r^2 = s - h'beta and |R_X|^2 = |G|. These are the "pieces" every engine returns:

- ``OneFactor``: all random terms share one grouping factor (``(1 | g)``, ``(1 + x | g)``,
  ``(1 | g) + (0 + x | g)``). W is block diagonal, one d x d block per group, and depends on the
  group only through A_j = Z_j'Z_j: groups with equal A_j (a random intercept: groups of equal
  size) form one class, and the pieces are sums over classes of W_c times per-class sums of
  B_j and c_j products (shared for X, per element for y). The criterion and its exact gradient
  (dW = P dT K + (P dT K)', P = I - W A, K = M^-1 T') cost a few matrix products per element.
- ``TwoFactors``: two grouping factors, crossed or nested. Levels of the factor with more levels
  are eliminated first (their blocks are diagonal), leaving a Schur complement on the other
  factor's levels, per connected component of the levels that share observations (a family for
  ``(1 | family/participant)``, a site for ``(1 | site) + (1 | participant)``). Compiled, one
  element at a time; the gradient by central differences of the pieces.

``minimise`` runs a projected Newton method with lme4's bounds on every element at once (a
Hessian by differences of the gradient, a backtracking line search, lme4's ``check.boundary``),
and falls back to L-BFGS-B per element where it does not converge. ``summarise`` gives lme4's
estimates, ``vcov``, ``VarCorr``, ``logLik``, and lmerTest's Satterthwaite df: the Hessian of
the deviance in (theta, sigma) (lmerTest's ``devfun_vp``) and the Jacobian of
vcov(beta) = sigma^2 G^-1, exactly as ``lmerTest:::as_lmerModLT`` and ``contest1D`` combine them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import optimize, special

from greyarray.stats.compiled import compiled

SINGULAR_TOL = 1e-4  # lme4's isSingular(tol = 1e-4)
BOUNDARY_TOL = 1e-5  # lmerControl(boundary.tol = 1e-5)
EIGEN_TOL = 1e-8  # lmerTest's as_lmerModLT(tol = 1e-8)


@dataclass(frozen=True)
class Factor:
    """The random terms of one grouping factor, merged: ``z`` (n, d) holds their columns side by
    side, and the relative covariance factor is T = sum_k theta[index[k]] u[k] e_{b[k]}' (in
    lme4's coordinates u[k] is a unit vector: theta fills T's lower triangle; the optimiser
    works on columns transformed by ``standardiser``, where u[k] is a column of C^-1)."""

    codes: np.ndarray  # (n,) level of each row
    z: np.ndarray  # (n, d)
    index: np.ndarray  # (k,) position in theta of each parameter of this factor
    u: np.ndarray  # (k, d)
    b: np.ndarray  # (k,) column of T

    @classmethod
    def lower_triangle(cls, codes: np.ndarray, z: np.ndarray, tmap: np.ndarray) -> Factor:
        """T's entries are theta's (``tmap`` (d, d): index into theta, -1 for zero)."""
        rows, cols = np.nonzero(tmap >= 0)
        index = tmap[rows, cols]
        order = np.argsort(index)
        u = np.eye(z.shape[1])[rows[order]]
        return cls(codes, z, index[order], u, cols[order])

    def transformed(self, transform: np.ndarray) -> Factor:
        """The same factor with T replaced by ``transform`` @ T."""
        return Factor(self.codes, self.z, self.index, self.u @ transform.T, self.b)


def theta_layout(sizes: list[int]) -> tuple[list[np.ndarray], np.ndarray]:
    """Per term of q coefficients, its (q, q) map into theta (lme4's order: the lower triangle
    column by column, terms one after another); and theta's lower bounds (0 on diagonals)."""
    maps, lower, start = [], [], 0
    for q in sizes:
        tmap = np.full((q, q), -1, dtype=np.int64)
        for j in range(q):
            for i in range(j, q):
                tmap[i, j] = start
                lower.append(0.0 if i == j else -np.inf)
                start += 1
        maps.append(tmap)
    return maps, np.array(lower)


def merge_terms(maps: list[np.ndarray]) -> np.ndarray:
    """Block-diagonal map of several terms of one factor (uncorrelated with each other)."""
    d = sum(m.shape[0] for m in maps)
    out = np.full((d, d), -1, dtype=np.int64)
    at = 0
    for m in maps:
        out[at : at + m.shape[0], at : at + m.shape[0]] = m
        at += m.shape[0]
    return out


def indicator(codes: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """(levels present x rows) sparse indicator, and each row's level among those present."""
    levels, inverse = np.unique(codes, return_inverse=True)
    inverse = inverse.ravel()
    ones = np.ones(codes.size)
    matrix = sp.csr_matrix((ones, (inverse, np.arange(codes.size))), (levels.size, codes.size))
    return matrix, inverse


def t_matrix(theta: np.ndarray, factor: Factor) -> np.ndarray:
    """(E, d, d) relative covariance factors of one factor from theta (E, k)."""
    d = factor.z.shape[1]
    out = np.zeros((theta.shape[0], d, d))
    for j, (index, col) in enumerate(zip(factor.index, factor.b, strict=True)):
        out[:, :, col] += theta[:, index, None] * factor.u[j]
    return out


def lower_t(theta: np.ndarray, tmap: np.ndarray) -> np.ndarray:
    """(E, q, q) lme4's T of one term (theta in its lower triangle)."""
    out = np.zeros((theta.shape[0], *tmap.shape))
    rows, cols = np.nonzero(tmap >= 0)
    out[:, rows, cols] = theta[:, tmap[rows, cols]]
    return out


# --------------------------------------------------------------------------------------------
# one grouping factor: classes of groups with equal Z_j'Z_j


@compiled
def _class_block(te, ac, d, m, chol, minv, k, w):  # pragma: no cover - compiled
    """For one class: M = I + T'AT, its Cholesky factor, M^-1, K = M^-1 T', W = T K; returns
    log|M|. Scratch arrays are the caller's (no allocation per class)."""
    for i in range(d):
        for j in range(d):
            total = 0.0
            for r in range(d):
                tr = te[r, i]
                if tr != 0.0:
                    for q in range(d):
                        total += tr * ac[r, q] * te[q, j]
            m[i, j] = total + (1.0 if i == j else 0.0)
    logdet = 0.0
    for j in range(d):
        diag = m[j, j]
        for r in range(j):
            diag -= chol[j, r] * chol[j, r]
        diag = np.sqrt(diag)
        chol[j, j] = diag
        logdet += 2.0 * np.log(diag)
        for i in range(j + 1, d):
            total = m[i, j]
            for r in range(j):
                total -= chol[i, r] * chol[j, r]
            chol[i, j] = total / diag
    for col in range(d):  # M^-1 = L^-T L^-1, column by column (into minv)
        for i in range(d):
            total = 1.0 if i == col else 0.0
            for r in range(i):
                total -= chol[i, r] * minv[r, col]
            minv[i, col] = total / chol[i, i]
        for i in range(d - 1, -1, -1):
            total = minv[i, col]
            for r in range(i + 1, d):
                total -= chol[r, i] * minv[r, col]
            minv[i, col] = total / chol[i, i]
    for i in range(d):
        for j in range(d):
            total = 0.0
            for r in range(d):
                total += minv[i, r] * te[j, r]
            k[i, j] = total
    for i in range(d):
        for j in range(d):
            total = 0.0
            for r in range(d):
                total += te[i, r] * k[r, j]
            w[i, j] = total
    return logdet


@compiled
def _p_matrix(w, ac, d, pm):  # pragma: no cover - compiled
    """P = I - W A (into pm)."""
    for r in range(d):
        for col in range(d):
            total = 0.0
            for q in range(d):
                total += w[r, q] * ac[q, col]
            pm[r, col] = (1.0 if r == col else 0.0) - total


@compiled
def _direction(k, ac, pm, u, b, d, pu):  # pragma: no cover - compiled
    """For dT = u e_b': P u (into pu), and returns (K A u)[b] (half of d log|M|)."""
    total = 0.0
    for r in range(d):
        ka = 0.0
        for q in range(d):
            ka += k[b, q] * ac[q, r]
        total += ka * u[r]
        acc = 0.0
        for q in range(d):
            acc += pm[r, q] * u[q]
        pu[r] = acc
    return total


@compiled
def _one_factor_values(t, idx, a, counts, pa, pb, pxx, sxy, syy, xx, xy, yy):  # pragma: no cover
    """Per element idx[i] (with T = t[i]): log|L|^2, G = X'X - B'WB, h = X'y - B'Wc and
    s = y'y - c'Wc, summed over classes of groups without intermediate arrays."""
    n_el, d = t.shape[0], t.shape[1]
    n_cl, n_pr, p = a.shape[0], pa.size, xx.shape[0]
    ld = np.zeros(n_el)
    g_out = np.empty((n_el, p, p))
    h_out = np.empty((n_el, p))
    s_out = np.empty(n_el)
    m, chol, minv = np.empty((d, d)), np.zeros((d, d)), np.empty((d, d))
    k, w = np.empty((d, d)), np.empty((d, d))
    for i in range(n_el):
        e = idx[i]
        g = g_out[i]
        g[:, :] = xx
        h = h_out[i]
        h[:] = xy[e]
        s = yy[e]
        for c in range(n_cl):
            ld[i] += counts[c] * _class_block(t[i], a[c], d, m, chol, minv, k, w)
            for q in range(n_pr):
                wq = w[pa[q], pb[q]]
                if wq == 0.0:
                    continue
                pq = pxx[c, q]
                for r in range(p):
                    for col in range(p):
                        g[r, col] -= wq * pq[r, col]
                sq = sxy[e, c, q]
                for r in range(p):
                    h[r] -= wq * sq[r]
                s -= wq * syy[e, c, q]
        s_out[i] = s
    return ld, g_out, h_out, s_out


@compiled
def _one_factor_gradient(
    t, tu, tb, idx, a, counts, pa, pb, pxx, sxy, syy, mat, beta, weight, full
):  # pragma: no cover - compiled
    """Per element: the gradient in theta of log|L|^2 + tr(mat dG)-part + weight r^2-part,
    i.e. d log|L|^2 + tr(mat dG) + weight (ds - 2 beta'dh) with dG = -sum dW (B'B), dh =
    -sum dW (B'c), ds = -sum dW (c'c) and dW = (P u) K[b, :] + transpose (P = I - W A). With
    ``mat`` = log|R_X|^2's G^-1 + weight beta beta', this is the profiled criterion's gradient.
    With ``full``, also dG itself (for lmerTest's Jacobian)."""
    n_el, d = t.shape[0], t.shape[1]
    n_cl, n_pr, p, n_th = a.shape[0], pa.size, mat.shape[1], tb.size
    grad = np.zeros((n_el, n_th))
    dg = np.zeros((n_el, n_th if full else 0, p, p))
    m, chol, minv = np.empty((d, d)), np.zeros((d, d)), np.empty((d, d))
    k, w, pm = np.empty((d, d)), np.empty((d, d)), np.empty((d, d))
    pu = np.empty(d)
    weights = np.empty(n_pr)
    for i in range(n_el):
        e = idx[i]
        for c in range(n_cl):
            ac = a[c]
            _class_block(t[i], ac, d, m, chol, minv, k, w)
            _p_matrix(w, ac, d, pm)
            for q in range(n_pr):  # what each pair of dW multiplies
                pq = pxx[c, q]
                quad = 0.0
                for r in range(p):
                    for col in range(p):
                        quad += mat[i, r, col] * pq[r, col]
                cross = 0.0
                sq = sxy[e, c, q]
                for r in range(p):
                    cross += sq[r] * beta[i, r]
                weights[q] = quad + weight[i] * (syy[e, c, q] - 2.0 * cross)
            for th in range(n_th):
                b = tb[th]
                value = 2.0 * _direction(k, ac, pm, tu[th], b, d, pu) * counts[c]
                for q in range(n_pr):
                    x, y = pa[q], pb[q]
                    dwq = pu[x] * k[b, y] + pu[y] * k[b, x]
                    if x == y:
                        dwq = 2.0 * pu[x] * k[b, x]
                    value -= dwq * weights[q]
                    if full:
                        pq = pxx[c, q]
                        for r in range(p):
                            for col in range(p):
                                dg[i, th, r, col] -= dwq * pq[r, col]
                grad[i, th] += value
    return grad, dg


class OneFactor:
    """The pieces for random terms sharing one grouping factor, on a fixed set of rows."""

    analytic = True

    def __init__(self, x: np.ndarray, factor: Factor):
        self.x, self.factor = x, factor
        z, d, p = factor.z, factor.z.shape[1], x.shape[1]
        self.pa, self.pb = np.triu_indices(d)
        self.pa, self.pb = self.pb.copy(), self.pa.copy()  # (a >= b) pairs of W's lower triangle
        groups, _ = indicator(factor.codes)
        self.n_groups = groups.shape[0]
        self.zsum = [groups.multiply(z[None, :, a]).tocsr() for a in range(d)]  # c_j = Z_j'y
        a_j = np.stack(
            [np.stack([self.zsum[a] @ z[:, b] for b in range(d)], 1) for a in range(d)], 1
        )
        b_j = np.stack([self.zsum[a] @ x for a in range(d)], 1)  # (m, d, p)
        keys, self.class_of, counts = np.unique(
            a_j.reshape(self.n_groups, -1), axis=0, return_inverse=True, return_counts=True
        )
        self.class_of = self.class_of.ravel()
        self.a = keys.reshape(-1, d, d)
        self.counts = counts.astype(np.float64)
        self.classes = sp.csr_matrix(
            (np.ones(self.n_groups), (self.class_of, np.arange(self.n_groups))),
            (len(counts), self.n_groups),
        )
        self.b = b_j
        self.weighted = [  # class indicator weighted by B_j[a, r]
            [self.classes.multiply(b_j[None, :, a, r]).tocsr() for r in range(p)] for a in range(d)
        ]
        self.sym = np.where(self.pa == self.pb, 1.0, 2.0)  # W symmetric: off-diagonal pairs twice
        pxx = []
        for a, b in zip(self.pa, self.pb, strict=True):
            outer = np.einsum("mi,mj->mij", b_j[:, a], b_j[:, b])
            outer = (outer + outer.transpose(0, 2, 1)) / 2
            sums = self.classes @ outer.reshape(self.n_groups, p * p)
            pxx.append(sums.reshape(self.classes.shape[0], p, p))
        self.pxx = np.stack(pxx, 1) * self.sym[None, :, None, None]  # (C, K, p, p)
        self.xx = x.T @ x
        self.n, self.p, self.d = x.shape[0], p, d

    @property
    def n_classes(self) -> int:
        return self.a.shape[0]

    def bytes_per_element(self) -> int:
        return 8 * self.n_classes * self.pa.size * (self.p + 1)

    def stats(self, y: np.ndarray) -> dict:
        """Per-element sums (elements first) for responses ``y`` (n, E)."""
        y, beta0 = residualise(self.x, y)
        c = [self.zsum[a] @ y for a in range(self.d)]  # (m, E) each
        n_el, n_pr = y.shape[1], self.pa.size
        syy = np.empty((n_el, self.n_classes, n_pr))
        sxy = np.empty((n_el, self.n_classes, n_pr, self.p))
        for q, (a, b) in enumerate(zip(self.pa, self.pb, strict=True)):
            syy[:, :, q] = (self.classes @ (c[a] * c[b])).T * self.sym[q]
            for r in range(self.p):  # sum over a class of B_j[a, r] c_j[b] (symmetrised)
                both = self.weighted[a][r] @ c[b] + self.weighted[b][r] @ c[a]
                sxy[:, :, q, r] = both.T * (self.sym[q] / 2)
        return {
            "syy": syy,
            "sxy": sxy,
            "xy": (self.x.T @ y).T,
            "yy": (y * y).sum(axis=0),
            "beta0": beta0,
        }

    def transformed(self, transforms: list[np.ndarray]) -> OneFactor:
        """The same structure with T replaced by transform @ T (lmm_fit.Factor.transformed)."""
        out = copy.copy(self)
        out.factor = self.factor.transformed(transforms[0])
        return out

    def values(self, theta: np.ndarray, stats: dict, idx: np.ndarray) -> dict:
        """log|L|^2, G, h and s of elements ``idx`` at ``theta`` (one row per element)."""
        ld, g, h, s = _one_factor_values(
            t_matrix(theta, self.factor), idx, self.a, self.counts, self.pa, self.pb,
            self.pxx, stats["sxy"], stats["syy"], self.xx, stats["xy"], stats["yy"],
        )  # fmt: skip
        return {"ldL2": ld, "G": g, "h": h, "s": s}

    def gradient(self, theta, stats, idx, mat, beta, weight, full=False):
        """(E, k) gradient of log|L|^2 + <mat, G-part> + weight r^2-part (see
        _one_factor_gradient), and dG (E, k, p, p) with ``full``."""
        return _one_factor_gradient(
            t_matrix(theta, self.factor), self.factor.u, self.factor.b, idx, self.a,
            self.counts, self.pa, self.pb, self.pxx, stats["sxy"], stats["syy"], mat, beta,
            weight, full,
        )  # fmt: skip


@compiled
def _w2(t00, t01, t10, t11, a00, a01, a11):  # pragma: no cover - compiled
    """d = 2 in closed form: det M, K = M^-1 T' and W = T K (w10 = w01) for T and A."""
    at00 = a00 * t00 + a01 * t10
    at01 = a00 * t01 + a01 * t11
    at10 = a01 * t00 + a11 * t10
    at11 = a01 * t01 + a11 * t11
    m00 = 1.0 + t00 * at00 + t10 * at10
    m01 = t00 * at01 + t10 * at11
    m11 = 1.0 + t01 * at01 + t11 * at11
    det = m00 * m11 - m01 * m01
    i00, i01, i11 = m11 / det, -m01 / det, m00 / det
    k00 = i00 * t00 + i01 * t01
    k01 = i00 * t10 + i01 * t11
    k10 = i01 * t00 + i11 * t01
    k11 = i01 * t10 + i11 * t11
    w00 = t00 * k00 + t01 * k10
    w01 = t00 * k01 + t01 * k11
    w11 = t10 * k01 + t11 * k11
    return det, k00, k01, k10, k11, w00, w01, w11


@compiled
def _block2(te, ac, k, w):  # pragma: no cover - compiled
    """_class_block for d = 2 in closed form (a random intercept and slope)."""
    det, k[0, 0], k[0, 1], k[1, 0], k[1, 1], w[0, 0], w[0, 1], w[1, 1] = _w2(
        te[0, 0], te[0, 1], te[1, 0], te[1, 1], ac[0, 0], ac[0, 1], ac[1, 1]
    )
    w[1, 0] = w[0, 1]
    return np.log(det)


@compiled
def _block(te, ac, d, m, chol, minv, k, w):  # pragma: no cover - compiled
    if d == 2:
        return _block2(te, ac, k, w)
    return _class_block(te, ac, d, m, chol, minv, k, w)


@compiled
def _group_values2(t, idx, a, group_class, c):  # pragma: no cover - compiled
    """_group_values for d = 2, in scalars (pairs (0, 0), (1, 0), (1, 1))."""
    n_el, n_gr = t.shape[0], group_class.size
    ld = np.zeros(n_el)
    wp = np.empty((n_el, n_gr, 3))
    v = np.empty((n_el, n_gr, 2))
    quad = np.zeros(n_el)
    for i in range(n_el):
        e = idx[i]
        t00, t01, t10, t11 = t[i, 0, 0], t[i, 0, 1], t[i, 1, 0], t[i, 1, 1]
        logdet, product, total = 0.0, 1.0, 0.0
        for j in range(n_gr):
            g = group_class[j]
            det, _, _, _, _, w00, w01, w11 = _w2(
                t00, t01, t10, t11, a[g, 0, 0], a[g, 0, 1], a[g, 1, 1]
            )
            product *= det  # det >= 1 (M = I + a positive semi-definite matrix)
            if product > 1e250:  # one log per many groups, never an overflow
                logdet += np.log(product)
                product = 1.0
            wp[i, j, 0], wp[i, j, 1], wp[i, j, 2] = w00, w01, w11
            c0, c1 = c[e, j, 0], c[e, j, 1]
            v0 = w00 * c0 + w01 * c1
            v1 = w01 * c0 + w11 * c1
            v[i, j, 0], v[i, j, 1] = v0, v1
            total += c0 * v0 + c1 * v1
        ld[i] = logdet + np.log(product)
        quad[i] = total
    return ld, wp, v, quad


@compiled
def _group_gradient2(t, tu, tb, idx, a, group_class, c, u, weights, weight, full):
    # pragma: no cover - compiled
    """_group_gradient for d = 2, in scalars."""
    n_el, n_gr, n_th = t.shape[0], group_class.size, tb.size
    grad = np.zeros((n_el, n_th))
    dwp = np.zeros((n_el, n_th if full else 0, n_gr, 3))
    for i in range(n_el):
        e = idx[i]
        t00, t01, t10, t11 = t[i, 0, 0], t[i, 0, 1], t[i, 1, 0], t[i, 1, 1]
        wt = weight[i]
        for j in range(n_gr):
            g = group_class[j]
            a00, a01, a11 = a[g, 0, 0], a[g, 0, 1], a[g, 1, 1]
            _, k00, k01, k10, k11, w00, w01, w11 = _w2(t00, t01, t10, t11, a00, a01, a11)
            p00 = 1.0 - (w00 * a00 + w01 * a01)  # P = I - W A
            p01 = -(w00 * a01 + w01 * a11)
            p10 = -(w01 * a00 + w11 * a01)
            p11 = 1.0 - (w01 * a01 + w11 * a11)
            c0, c1, u0, u1 = c[e, j, 0], c[e, j, 1], u[i, j, 0], u[i, j, 1]
            q0, q1, q2 = weights[i, j, 0], weights[i, j, 1], weights[i, j, 2]
            for th in range(n_th):
                x0, x1 = tu[th, 0], tu[th, 1]
                if tb[th] == 0:
                    kb0, kb1 = k00, k01
                else:
                    kb0, kb1 = k10, k11
                dlog = 2.0 * (kb0 * (a00 * x0 + a01 * x1) + kb1 * (a01 * x0 + a11 * x1))
                pu0 = p00 * x0 + p01 * x1
                pu1 = p10 * x0 + p11 * x1
                c_pu, c_k = c0 * pu0 + c1 * pu1, c0 * kb0 + c1 * kb1
                u_pu, u_k = u0 * pu0 + u1 * pu1, u0 * kb0 + u1 * kb1
                d00 = 2.0 * pu0 * kb0
                d01 = pu1 * kb0 + pu0 * kb1
                d11 = 2.0 * pu1 * kb1
                grad[i, th] += (
                    dlog
                    - wt * (2.0 * c_pu * c_k - 2.0 * (u_pu * c_k + c_pu * u_k))
                    - (d00 * q0 + d01 * q1 + d11 * q2)
                )
                if full:
                    dwp[i, th, j, 0], dwp[i, th, j, 1], dwp[i, th, j, 2] = d00, d01, d11
    return grad, dwp


@compiled
def _group_values(t, idx, a, group_class, c, pa, pb):  # pragma: no cover - compiled
    """Per element idx[i] and group j (class group_class[j]): log|M_j| summed, W_j's pairs,
    v_j = W_j c_j and the sum of c_j'W_j c_j."""
    n_el, d = t.shape[0], t.shape[1]
    n_gr, n_pr = group_class.size, pa.size
    ld = np.zeros(n_el)
    wp = np.empty((n_el, n_gr, n_pr))
    v = np.empty((n_el, n_gr, d))
    quad = np.zeros(n_el)
    m, chol, minv = np.empty((d, d)), np.zeros((d, d)), np.empty((d, d))
    k, w = np.empty((d, d)), np.empty((d, d))
    for i in range(n_el):
        e = idx[i]
        for j in range(n_gr):
            ld[i] += _block(t[i], a[group_class[j]], d, m, chol, minv, k, w)
            for q in range(n_pr):
                wp[i, j, q] = w[pa[q], pb[q]]
            total = 0.0
            for r in range(d):
                acc = 0.0
                for col in range(d):
                    acc += w[r, col] * c[e, j, col]
                v[i, j, r] = acc
                total += c[e, j, r] * acc
            quad[i] += total
    return ld, wp, v, quad


@compiled
def _group_gradient(t, tu, tb, idx, a, group_class, c, u, weights, weight, pa, pb, full):
    # pragma: no cover - compiled
    """Per element: d log|L|^2 - sum_j [<dW_j, weights_j> + weight (c_j'dW_j c_j - 2 u_j'dW_j
    c_j)] for each theta (u_j = B_j beta; ``weights`` (E, groups, pairs) = <mat, B_j'B_j>'s
    pairs); with ``full`` also dW's pairs (E, k, groups, pairs) for dG."""
    n_el, d = t.shape[0], t.shape[1]
    n_gr, n_pr, n_th = group_class.size, pa.size, tb.size
    grad = np.zeros((n_el, n_th))
    dwp = np.zeros((n_el, n_th if full else 0, n_gr, n_pr))
    m, chol, minv = np.empty((d, d)), np.zeros((d, d)), np.empty((d, d))
    k, w, pm = np.empty((d, d)), np.empty((d, d)), np.empty((d, d))
    pu = np.empty(d)
    for i in range(n_el):
        e = idx[i]
        for j in range(n_gr):
            ac = a[group_class[j]]
            _block(t[i], ac, d, m, chol, minv, k, w)
            _p_matrix(w, ac, d, pm)
            for th in range(n_th):
                b = tb[th]
                dlog = _direction(k, ac, pm, tu[th], b, d, pu)
                # dW = pu K[b, :] + transpose: x'dW y = (x.pu)(K[b].y) + (y.pu)(K[b].x)
                c_pu, c_k, u_pu, u_k = 0.0, 0.0, 0.0, 0.0
                for r in range(d):
                    c_pu += c[e, j, r] * pu[r]
                    c_k += c[e, j, r] * k[b, r]
                    u_pu += u[i, j, r] * pu[r]
                    u_k += u[i, j, r] * k[b, r]
                value = 2.0 * dlog - weight[i] * (
                    2.0 * c_pu * c_k - 2.0 * (u_pu * c_k + c_pu * u_k)
                )
                for q in range(n_pr):
                    x, y = pa[q], pb[q]
                    dwq = pu[x] * k[b, y] + pu[y] * k[b, x]
                    value -= dwq * weights[i, j, q]
                    if full:
                        dwp[i, th, j, q] = dwq
                grad[i, th] += value
    return grad, dwp


class GroupForm:
    """The pieces for random terms sharing one grouping factor when most groups differ (random
    slopes on continuous covariates): per element only c_j = Z_j'y is kept, and the sums over
    groups are matrix products (G, h and the gradient's weights) around a small kernel."""

    analytic = True

    def __init__(self, x: np.ndarray, factor: Factor):
        self.factor = factor
        z, d, p = factor.z, factor.z.shape[1], x.shape[1]
        self.pa, self.pb = np.tril_indices(d)
        groups, _ = indicator(factor.codes)
        self.n_groups = groups.shape[0]
        self.zsum = [groups.multiply(z[None, :, a]).tocsr() for a in range(d)]
        a_j = _gram(self.zsum, z)
        self.a, self.group_class = np.unique(
            a_j.reshape(self.n_groups, -1), axis=0, return_inverse=True
        )
        self.a = np.ascontiguousarray(self.a.reshape(-1, d, d))
        self.group_class = self.group_class.ravel()
        b_j = np.stack([self.zsum[a] @ x for a in range(d)], 1)  # (m, d, p)
        self.b = b_j.reshape(self.n_groups * d, p)
        sym = np.where(self.pa == self.pb, 1.0, 2.0)
        pxx = np.einsum("mqi,mqj->mqij", b_j[:, self.pa], b_j[:, self.pb])
        pxx = (pxx + pxx.transpose(0, 1, 3, 2)) / 2 * sym[None, :, None, None]
        self.pxx = pxx.reshape(self.n_groups * self.pa.size, p * p)
        self.x, self.xx, self.n, self.p, self.d = x, x.T @ x, x.shape[0], p, d
        self.closed_form = d == 2  # intercept and slope: the 2 x 2 kernels

    def transformed(self, transforms: list[np.ndarray]) -> GroupForm:
        out = copy.copy(self)
        out.factor = self.factor.transformed(transforms[0])
        return out

    def bytes_per_element(self) -> int:
        return 8 * self.n_groups * (2 * self.d + 2 * self.pa.size)

    def stats(self, y: np.ndarray) -> dict:
        y, beta0 = residualise(self.x, y)
        c = np.stack([s @ y for s in self.zsum], 1)  # (m, d, E)
        return {
            "c": np.ascontiguousarray(c.transpose(2, 0, 1)),
            "xy": (self.x.T @ y).T,
            "yy": (y * y).sum(axis=0),
            "beta0": beta0,
        }

    def values(self, theta: np.ndarray, stats: dict, idx: np.ndarray) -> dict:
        t = t_matrix(theta, self.factor)
        if self.closed_form:
            ld, wp, v, quad = _group_values2(t, idx, self.a, self.group_class, stats["c"])
        else:
            ld, wp, v, quad = _group_values(
                t, idx, self.a, self.group_class, stats["c"], self.pa, self.pb
            )
        n_el, p = idx.size, self.p
        return {
            "ldL2": ld,
            "G": self.xx - (wp.reshape(n_el, -1) @ self.pxx).reshape(n_el, p, p),
            "h": stats["xy"][idx] - v.reshape(n_el, -1) @ self.b,
            "s": stats["yy"][idx] - quad,
        }

    def gradient(self, theta, stats, idx, mat, beta, weight, full=False):
        n_el, p = idx.size, self.p
        weights = (mat.reshape(n_el, p * p) @ self.pxx.T).reshape(n_el, self.n_groups, -1)
        u = (beta @ self.b.T).reshape(n_el, self.n_groups, self.d)
        t, factor = t_matrix(theta, self.factor), self.factor
        if self.closed_form:
            grad, dwp = _group_gradient2(
                t, factor.u, factor.b, idx, self.a, self.group_class, stats["c"], u, weights,
                weight, full,
            )  # fmt: skip
        else:
            grad, dwp = _group_gradient(
                t, factor.u, factor.b, idx, self.a, self.group_class, stats["c"], u, weights,
                weight, self.pa, self.pb, full,
            )  # fmt: skip
        if not full:
            return grad, None
        k = self.factor.b.size
        dg = -(dwp.reshape(n_el * k, -1) @ self.pxx).reshape(n_el, k, p, p)
        return grad, dg


# --------------------------------------------------------------------------------------------
# two grouping factors: Schur complement on the factor with fewer levels, per component


@compiled
def _two_factor_pieces(  # pragma: no cover - compiled
    t1,
    t2,
    idx,
    a1,
    u1,
    a2,
    u2,
    pair_start,
    pair_f,
    pair_a,
    comp_i,
    comp_i_start,
    comp_f,
    comp_f_start,
    f_local,
):
    """Per element idx[e] (T's t1[e], t2[e]): log|M| and
    Q = [X y]' Z Lambda M^-1 Lambda' Z' [X y] ((p+1) x (p+1)).

    a1 (m1, d1, d1), u1 (E, m1, d1, p+1) = Z1_i'[X y]; a2, u2 the same for factor 2; the
    observations shared by level i of factor 1 and level f of factor 2 give pair_a = Z1_i'Z2_f
    (d1 x d2), listed per i (pair_start) with pair_f. Components list their levels of each
    factor; f_local is the position of f within its component."""
    n_el, d1, d2 = t1.shape[0], t1.shape[1], t2.shape[1]
    pp = u1.shape[3]
    logdet = np.zeros(n_el)
    q_out = np.zeros((n_el, pp, pp))
    for e in range(n_el):
        te1, te2, row = t1[e], t2[e], idx[e]
        for c in range(comp_i_start.size - 1):
            f0, f1 = comp_f_start[c], comp_f_start[c + 1]
            size = (f1 - f0) * d2
            s = np.eye(size)
            r = np.zeros((size, pp))
            for fi in range(f0, f1):
                f = comp_f[fi]
                o = (fi - f0) * d2
                s[o : o + d2, o : o + d2] += te2.T @ a2[f] @ te2
                r[o : o + d2] = te2.T @ u2[row, f]
            for ii in range(comp_i_start[c], comp_i_start[c + 1]):
                i = comp_i[ii]
                m = np.eye(d1) + te1.T @ a1[i] @ te1
                chol = np.linalg.cholesky(m)
                for j in range(d1):
                    logdet[e] += 2.0 * np.log(chol[j, j])
                u = te1.T @ u1[row, i]
                nmat = np.zeros((d1, size))
                for pi in range(pair_start[i], pair_start[i + 1]):
                    o = f_local[pair_f[pi]] * d2
                    nmat[:, o : o + d2] = te1.T @ pair_a[pi] @ te2
                minv = np.linalg.inv(m)
                mu = minv @ u
                q_out[e] += u.T @ mu
                s -= nmat.T @ minv @ nmat
                r -= nmat.T @ mu
            if size:
                chol = np.linalg.cholesky(s)
                for j in range(size):
                    logdet[e] += 2.0 * np.log(chol[j, j])
                q_out[e] += r.T @ np.linalg.solve(s, r)
    return logdet, q_out


class TwoFactors:
    """The pieces for random terms on two grouping factors (crossed or nested)."""

    analytic = False

    def __init__(self, x: np.ndarray, first: Factor, second: Factor):
        (one, i_of), (two, f_of) = indicator(first.codes), indicator(second.codes)
        self.order = 0
        if one.shape[0] < two.shape[0]:  # eliminate the factor with more levels first
            first, second, one, two, i_of, f_of = second, first, two, one, f_of, i_of
            self.order = 1
        self.n1, self.n2 = one.shape[0], two.shape[0]
        self.first, self.second, self.x = first, second, x
        self.n, self.p = x.shape
        self.sums1 = [one.multiply(first.z[None, :, a]).tocsr() for a in range(first.z.shape[1])]
        self.sums2 = [two.multiply(second.z[None, :, a]).tocsr() for a in range(second.z.shape[1])]
        self.a1 = _gram(self.sums1, first.z)
        self.a2 = _gram(self.sums2, second.z)
        pairs, pair_index = np.unique(i_of * self.n2 + f_of, return_inverse=True)
        pair_rows = sp.csr_matrix(
            (np.ones(self.n), (pair_index.ravel(), np.arange(self.n))), (pairs.size, self.n)
        )
        d1, d2 = first.z.shape[1], second.z.shape[1]
        self.pair_a = np.stack(
            [
                np.stack([pair_rows @ (first.z[:, a] * second.z[:, b]) for b in range(d2)], 1)
                for a in range(d1)
            ],
            1,
        )  # (pairs, d1, d2)
        pi, pf = pairs // self.n2, pairs % self.n2
        self.pair_start = np.searchsorted(pi, np.arange(self.n1 + 1))
        self.pair_f = pf
        graph = sp.csr_matrix(
            (np.ones(pairs.size), (pi, self.n1 + pf)), (self.n1 + self.n2, self.n1 + self.n2)
        )
        n_comp, label = sp.csgraph.connected_components(graph, directed=False)
        self.comp_i = np.argsort(label[: self.n1], kind="stable")
        self.comp_i_start = np.searchsorted(label[: self.n1][self.comp_i], np.arange(n_comp + 1))
        self.comp_f = np.argsort(label[self.n1 :], kind="stable")
        self.comp_f_start = np.searchsorted(label[self.n1 :][self.comp_f], np.arange(n_comp + 1))
        self.f_local = np.empty(self.n2, dtype=np.int64)
        for c in range(n_comp):
            members = self.comp_f[self.comp_f_start[c] : self.comp_f_start[c + 1]]
            self.f_local[members] = np.arange(members.size)
        self.ux1 = np.stack([s @ x for s in self.sums1], 1)  # (m1, d1, p)
        self.ux2 = np.stack([s @ x for s in self.sums2], 1)
        self.xx = x.T @ x

    def transformed(self, transforms: list[np.ndarray]) -> TwoFactors:
        """The same structure with each factor's T replaced by transform @ T."""
        out = copy.copy(self)
        swap = transforms if self.order == 0 else transforms[::-1]
        out.first = self.first.transformed(swap[0])
        out.second = self.second.transformed(swap[1])
        return out

    def bytes_per_element(self) -> int:
        d1, d2 = self.first.z.shape[1], self.second.z.shape[1]
        return 8 * (self.p + 1) * (self.n1 * d1 + self.n2 * d2) * 2

    def stats(self, y: np.ndarray) -> dict:
        y, beta0 = residualise(self.x, y)

        def joined(sums, ux):
            uy = np.stack([s @ y for s in sums], 1)  # (m, d, E)
            u = np.concatenate(
                [np.broadcast_to(ux[..., None], (*ux.shape, y.shape[1])), uy[:, :, None]], 2
            )
            return np.ascontiguousarray(u.transpose(3, 0, 1, 2))  # (E, m, d, p+1)

        return {
            "u1": joined(self.sums1, self.ux1),
            "u2": joined(self.sums2, self.ux2),
            "xy": (self.x.T @ y).T,
            "yy": (y * y).sum(axis=0),
            "beta0": beta0,
        }

    def values(self, theta: np.ndarray, stats: dict, idx: np.ndarray) -> dict:
        """log|L|^2, G, h and s of elements ``idx`` at ``theta`` (one row per element)."""
        t1 = t_matrix(theta, self.first)
        t2 = t_matrix(theta, self.second)
        logdet, q = _two_factor_pieces(
            t1,
            t2,
            idx,
            self.a1,
            stats["u1"],
            self.a2,
            stats["u2"],
            self.pair_start,
            self.pair_f,
            self.pair_a,
            self.comp_i,
            self.comp_i_start,
            self.comp_f,
            self.comp_f_start,
            self.f_local,
        )
        p = self.p
        return {
            "ldL2": logdet,
            "G": self.xx - q[:, :p, :p],
            "h": stats["xy"][idx] - q[:, :p, p],
            "s": stats["yy"][idx] - q[:, p, p],
        }


def residualise(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y - X b, b) with b the least-squares coefficients: the mixed model of the residual is
    the same model (beta shifted by b), and its cross products have no cancellation (y'y can
    be a thousand times r^2, which would leave the criterion only 1e-13 precise)."""
    q, r = np.linalg.qr(x)
    coef = q.T @ y
    rest = y - q @ coef
    return rest, np.linalg.solve(r, coef).T


def _gram(sums, z) -> np.ndarray:
    d = z.shape[1]
    return np.ascontiguousarray(
        np.stack([np.stack([sums[a] @ z[:, b] for b in range(d)], 1) for a in range(d)], 1)
    )


def engine(x: np.ndarray, factors: list[Factor]):
    """The engine for a fixed design and random structure: classes of equal groups when they
    are few (random intercepts), group by group otherwise, or two factors."""
    if len(factors) == 2:
        return TwoFactors(x, *factors)
    one = OneFactor(x, factors[0])
    if one.n_classes * one.pa.size * (one.p + 1) <= 2 * one.n_groups * one.d:
        return one
    return GroupForm(x, factors[0])


# --------------------------------------------------------------------------------------------
# the profiled criterion


class Criterion:
    """lme4's profiled deviance (REML or ML) of a block of elements, with its gradient.

    ``engine`` gives the pieces (``values``) and, when it has exact derivatives, ``gradient``;
    otherwise the pieces are differentiated by central differences. ``stats`` are its
    per-element sums (all elements of the block; ``idx`` chooses among them)."""

    def __init__(self, engine, stats: dict, n: int, p: int, k: int, reml: bool):
        self.engine, self.stats = engine, stats
        self.n, self.p, self.k, self.reml = n, p, k, reml
        self.analytic = engine.analytic
        self.nu = n - p if reml else n

    def profile(self, piece: dict) -> dict:
        """beta, r^2, log|R_X|^2 and the criterion from the pieces."""
        g, ok = _positive_definite(piece["G"])
        chol = np.linalg.cholesky(g)
        beta = np.linalg.solve(g, piece["h"][..., None])[..., 0]
        r2 = piece["s"] - np.einsum("ep,ep->e", piece["h"], beta)
        ok &= r2 > 0
        ld_rx2 = 2 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
        nu = self.nu
        with np.errstate(invalid="ignore", divide="ignore"):
            dev = piece["ldL2"] + nu * (1 + np.log(2 * np.pi * r2 / nu))
        if self.reml:
            dev = dev + ld_rx2
        dev = np.where(ok, dev, np.inf)  # far from the optimum, X'V^-1 X lost to rounding
        return {"dev": dev, "beta": beta, "r2": r2, "ld_rx2": ld_rx2, "chol": chol, **piece}

    def __call__(self, theta: np.ndarray, idx: np.ndarray, grad: bool = True) -> dict:
        """The criterion at ``theta`` of elements ``idx`` (and its gradient ``grad``);
        ``beta`` of the residualised response, ``fixef`` of the response."""
        out = self.profile(self.engine.values(theta, self.stats, idx))
        out["fixef"] = out["beta"] + self.stats["beta0"][idx]
        if grad:
            out["ginv"] = _cho_inverse(out["chol"])
            out["grad"] = self.gradient(theta, idx, out, self.nu / out["r2"])[0]
        return out

    def gradient(self, theta, idx, state, weight, reml=None, full=False):
        """(E, k) gradient of log|L|^2 (+ log|R_X|^2 under REML) + weight r^2 at fixed weight,
        and dG (E, k, p, p) with ``full``. weight = nu / r^2 gives the criterion's gradient."""
        reml = self.reml if reml is None else reml
        beta = state["beta"]
        mat = weight[:, None, None] * np.einsum("ep,eq->epq", beta, beta)
        if reml:
            mat = mat + state["ginv"]
        if self.analytic:
            return self.engine.gradient(theta, self.stats, idx, mat, beta, weight, full)
        d = self._differences(theta, idx)
        grad = (
            d["ldL2"]
            + np.einsum("epq,ekpq->ek", mat, d["G"])
            + weight[:, None] * (d["s"] - 2 * np.einsum("ekp,ep->ek", d["h"], beta))
        )
        return grad, d["G"]

    def _differences(self, theta: np.ndarray, idx: np.ndarray) -> dict:
        """Central differences of the pieces in each parameter."""
        steps = 1e-5 * np.maximum(np.abs(theta), 0.1)
        out = {}
        for j in range(self.k):
            shift = np.zeros_like(theta)
            shift[:, j] = steps[:, j]
            up = self.engine.values(theta + shift, self.stats, idx)
            down = self.engine.values(theta - shift, self.stats, idx)
            for name in ("ldL2", "G", "h", "s"):
                if j == 0:
                    out[name] = np.empty((theta.shape[0], self.k, *up[name].shape[1:]))
                width = 2 * steps[:, j].reshape(-1, *([1] * (up[name].ndim - 1)))
                out[name][:, j] = (up[name] - down[name]) / width
        return out


def _positive_definite(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G with the identity where it is not numerically positive definite, which ones are)."""
    try:
        np.linalg.cholesky(g)
        return g, np.ones(g.shape[0], dtype=bool)
    except np.linalg.LinAlgError:
        pass
    ok = np.array([_is_positive_definite(m) for m in g])
    return np.where(ok[:, None, None], g, np.eye(g.shape[1])), ok


def _is_positive_definite(m: np.ndarray) -> bool:
    try:
        np.linalg.cholesky(m)
        return bool(np.isfinite(m).all())
    except np.linalg.LinAlgError:
        return False


def _cho_inverse(chol: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(chol)
    return np.einsum("eji,ejk->eik", inv, inv)


# --------------------------------------------------------------------------------------------
# optimisation


@dataclass
class Optimum:
    theta: np.ndarray  # (E, k)
    dev: np.ndarray  # (E,)
    converged: np.ndarray  # (E,) bool


def reflections(tmaps: list[np.ndarray]) -> list[tuple[int, np.ndarray]]:
    """Per diagonal parameter, the parameters below it in its column of T. Where the diagonal
    is 0, flipping their signs gives the same covariance (T D T' with D = diag(+-1)), but the
    criterion's slope along the diagonal changes sign: the two correlations' basins meet there."""
    out = []
    for tmap in tmaps:
        for j in range(tmap.shape[0]):
            below = tmap[j + 1 :, j]
            below = below[below >= 0]
            if below.size:
                out.append((int(tmap[j, j]), below))
    return out


def minimise(
    criterion: Criterion,
    theta0: np.ndarray,
    lower: np.ndarray,
    reflect: list[tuple[int, np.ndarray]] = (),
    max_iter: int = 200,
    gtol: float = 1e-10,
    xtol: float = 1e-9,
    restart: bool = True,
) -> Optimum:
    """Projected quasi-Newton on every element at once, from ``theta0`` (E, k), with lme4's
    lower bounds: BFGS updates of a Hessian that starts, and is checked, by differences of the
    exact gradient. A point is a candidate when its projected gradient is below ``gtol``
    (relative to the criterion) or its step below ``xtol`` (relative to theta); it is accepted
    when the Hessian there has no direction of negative curvature (else it is left along
    that direction: a saddle, or a ridge at a bound), and when a diagonal at its bound 0 does
    not lead downhill once its column is reflected (``reflect``; then it goes on from the
    reflected point). A point where even a fresh Hessian's step finds no decrease (the
    criterion's rounding) has the same checks once, so that a saddle or a reflection is not
    missed there. Elements that do not converge are minimised again one by one (L-BFGS-B
    from several starts)."""
    n_el = theta0.shape[0]
    theta = np.maximum(theta0.astype(np.float64), lower)
    everyone = np.arange(n_el)
    state = criterion(theta, everyone)
    dev, grad = state["dev"].copy(), state["grad"].copy()
    hess = _positive(_hessian(criterion, theta, grad, everyone))
    checked = np.zeros(n_el, dtype=bool)  # hess is a fresh difference Hessian
    converged = np.zeros(n_el, dtype=bool)
    stalled = np.zeros(n_el, dtype=bool)  # stuck even with a fresh Hessian
    escaping = np.zeros(n_el, dtype=bool)  # stepping off a saddle: a real decrease only
    active = everyone
    for _ in range(max_iter):
        if not active.size:
            break
        th, g, f = theta[active], grad[active], dev[active]
        at_bound = (th <= lower) & (g >= 0)
        small = np.where(at_bound, 0.0, np.abs(g)).max(axis=1) <= gtol * (1 + np.abs(f))
        step = _newton_step(hess[active], g, at_bound)
        tiny = (np.abs(step) <= xtol * np.maximum(1, np.abs(th))).all(axis=1)
        candidate = small | tiny | stalled[active]
        if candidate.any():  # check the curvature with a difference Hessian
            where = np.flatnonzero(candidate)
            exact = _hessian(criterion, th[where], g[where], active[where])
            flat = at_bound[where] & (g[where] <= 1e-8 * (1 + np.abs(f[where]))[:, None])
            curvature, direction = _curvature(exact, at_bound[where], flat)
            scale = 1 + np.abs(np.diagonal(exact, axis1=1, axis2=2)).max(axis=1)
            # next to a bound (a variance near 0), a tighter tolerance: where the other
            # parameters' curvatures are 1e2, a diagonal's -1e-5 still leads to a better optimum
            near = (th[where] - lower < 1e-4 * np.maximum(1, np.abs(th[where]))).any(axis=1)
            convex = curvature >= -np.where(near, 1e-9, 1e-6) * scale
            better, new_th, new_g, new_h = _reflected(th[where], g[where], exact, reflect)
            if better.any():  # the other correlation's basin is downhill: go on there
                go = where[better]
                theta[active[go]], grad[active[go]] = new_th[better], new_g[better]
                th[go], g[go] = new_th[better], new_g[better]
                hess[active[go]] = _positive(new_h[better])
                step[go] = _newton_step(hess[active[go]], g[go], np.zeros_like(g[go], bool))
            converged[active[where[convex & ~better & ~stalled[active[where]]]]] = True
            saddle = where[~convex & ~better]
            if saddle.size:
                step[saddle] = _escape(direction[~convex & ~better], th[saddle], g[saddle], lower)
                escaping[active[saddle]] = True
                hess[active[saddle]] = _positive(exact[~convex & ~better])
            keep = ~np.isin(np.arange(active.size), where[convex & ~better])
            active, th, g, f, step = active[keep], th[keep], g[keep], f[keep], step[keep]
            if not active.size:
                break
        new_theta, new_dev, new_grad, accepted = _line_search(
            criterion, th, f, g, step, lower, active, escaping[active]
        )
        escaping[active] = False
        moved = active[accepted]
        s_k = new_theta[accepted] - th[accepted]
        y_k = new_grad[accepted] - g[accepted]
        theta[moved], dev[moved], grad[moved] = (
            new_theta[accepted],
            new_dev[accepted],
            new_grad[accepted],
        )
        hess[moved] = _bfgs(hess[moved], s_k, y_k)
        stuck = active[~accepted]  # no decrease along a quasi-Newton step: a fresh Hessian
        retry = stuck[~checked[stuck]]
        if retry.size:
            hess[retry] = _positive(_hessian(criterion, theta[retry], grad[retry], retry))
        again = stuck[checked[stuck] & ~stalled[stuck]]  # checked once more, then dropped
        checked[moved], stalled[moved] = False, False
        checked[retry], stalled[again] = True, True
        active = np.sort(np.concatenate([moved, retry, again]))
    failed = np.flatnonzero(~converged)
    for e in failed:  # robust fallback, one element at a time
        found = _fallback(criterion, theta[e], theta0[e], lower, e)
        if found[1] <= dev[e]:
            theta[e], dev[e], converged[e] = found
        else:  # ended a rounding error above the point it started from: keep that point
            converged[e] = found[2] and found[1] <= dev[e] + 1e-12 * (1 + abs(dev[e]))
    if restart:
        _restart_singular(criterion, theta, dev, converged, lower, reflect, max_iter)
    _check_boundary(criterion, theta, dev, lower)
    return Optimum(theta, dev, converged)


class _Subset:
    """A criterion restricted to elements ``ids`` (numbered 0.. in the restriction)."""

    def __init__(self, criterion, ids):
        self.criterion, self.ids = criterion, ids

    def __call__(self, theta, idx, grad=True):
        return self.criterion(theta, self.ids[idx], grad=grad)

    def __getattr__(self, name):
        return getattr(self.criterion, name)


def _restart_singular(criterion, theta, dev, converged, lower, reflect, max_iter) -> None:
    """A singular optimum (a diagonal at 0) can be a local one beside a better optimum with
    that variance positive, reached across a nearby bound (seen: 1e-3 in logLik on an ML
    random slope): such elements are minimised again from their point with the zero
    diagonals at 0.1, and keep whichever criterion is lower."""
    diagonal = lower == 0
    ids = np.flatnonzero((theta[:, diagonal] < SINGULAR_TOL).any(axis=1) & np.isfinite(dev))
    if not ids.size:
        return
    start = theta[ids].copy()
    start[:, diagonal] = np.where(start[:, diagonal] < SINGULAR_TOL, 0.1, start[:, diagonal])
    again = minimise(_Subset(criterion, ids), start, lower, reflect, max_iter, restart=False)
    better = again.dev < dev[ids]
    theta[ids[better]], dev[ids[better]] = again.theta[better], again.dev[better]
    converged[ids[better]] = again.converged[better]


def _reflected(theta, grad, hess, reflect):
    """Points at which a diagonal at its bound 0 would lead downhill once its column is
    reflected (see ``reflections``): the criterion is invariant under R = flipping that column
    (diagonal included), so there the gradient is R g (its diagonal component changes sign)
    and the Hessian R H R. Returns (mask, theta, gradient, Hessian) after reflection."""
    flip = np.ones_like(theta)
    for diagonal, below in reflect:
        at = (
            (theta[:, diagonal] == 0)
            & (grad[:, diagonal] > 0)
            & (np.abs(theta[:, below]) > 0).any(axis=1)
        )
        flip[np.ix_(at, [diagonal, *below])] = -1
    hit = (flip < 0).any(axis=1)
    return hit, theta * flip, grad * flip, hess * flip[:, :, None] * flip[:, None, :]


def _positive(hess: np.ndarray) -> np.ndarray:
    """The Hessian with |eigenvalues| (floored): a positive definite model of the criterion
    (the identity where differences failed)."""
    finite = np.isfinite(hess).all(axis=(1, 2))
    hess = np.where(finite[:, None, None], hess, np.eye(hess.shape[1]))
    values, vectors = np.linalg.eigh(hess)
    scale = np.abs(values).max(axis=1, keepdims=True)
    values = np.maximum(np.abs(values), 1e-8 * scale + 1e-300)
    return np.einsum("eij,ej,ekj->eik", vectors, values, vectors)


def _bfgs(hess: np.ndarray, s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Damped BFGS update (Powell): stays positive definite."""
    hs = np.einsum("eij,ej->ei", hess, s)
    shs = np.einsum("ei,ei->e", s, hs)
    sy = np.einsum("ei,ei->e", s, y)
    ok = shs > 0
    damped = sy < 0.2 * shs  # then shs - sy > 0.8 shs > 0
    theta = np.where(damped & ok, 0.8 * shs / np.where(damped & ok, shs - sy, 1.0), 1.0)
    r = theta[:, None] * y + (1 - theta[:, None]) * hs
    sr = np.einsum("ei,ei->e", s, r)
    ok &= sr > 0
    safe_shs, safe_sr = np.where(ok, shs, 1.0), np.where(ok, sr, 1.0)
    update = (
        hess
        - np.einsum("ei,ej->eij", hs, hs) / safe_shs[:, None, None]
        + np.einsum("ei,ej->eij", r, r) / safe_sr[:, None, None]
    )
    return np.where(ok[:, None, None], update, hess)


def _curvature(hess: np.ndarray, at_bound: np.ndarray, flat: np.ndarray):
    """Smallest curvature of the Hessian over the directions a point may move in, and a unit
    direction with it (feasible: upwards at a bound). Free parameters move either way; a
    parameter at its bound with a positive gradient on its own (its diagonal); one at its
    bound with a zero gradient (``flat``) upwards jointly with the free ones. At lme4's origin
    (theta = 0) every diagonal is flat and the gradient 0, and the criterion may fall only
    along a mixed direction (an intercept and a correlated slope growing together) that
    neither the free block nor a diagonal shows: a saddle, not an optimum."""
    n_el, k = hess.shape[:2]
    eye = np.eye(k)[None]
    big = 1e3 * (1 + np.abs(hess).max(axis=(1, 2)))[:, None, None]
    free = ~at_bound
    best, direction = np.full(n_el, np.inf), np.zeros((n_el, k))

    def keep(value, vector):
        lower = value < best
        best[lower], direction[lower] = value[lower], vector[lower]

    masks = [free] + [free | (flat & (np.arange(k) == j)) for j in range(k) if flat[:, j].any()]
    if flat.any():
        masks.append(free | flat)
    for mask in masks:  # lowest eigenpair of the Hessian on the parameters in mask
        pair = mask[:, :, None] & mask[:, None, :]
        values, vectors = np.linalg.eigh(
            np.where(pair, hess, 0.0) + np.where(mask, 0.0, 1.0)[:, :, None] * big * eye
        )
        vector = np.where(mask, vectors[:, :, 0], 0.0)
        down = (np.where(flat, vector, 0.0) < 0).any(axis=1)
        vector = np.where(down[:, None], -vector, vector)  # a single flat parameter: upwards
        vector = np.where(flat, np.maximum(vector, 0.0), vector)  # several: the feasible part
        norm = np.linalg.norm(vector, axis=1)
        ok = (values[:, 0] < big[:, 0, 0]) & (norm > 0)
        vector = vector / np.where(ok, norm, 1.0)[:, None]
        value = np.einsum("ei,eij,ej->e", vector, hess, vector)
        keep(np.where(ok, value, np.inf), vector)
    diagonal = np.where(at_bound, np.diagonal(hess, axis1=1, axis2=2), np.inf)
    j = np.argmin(diagonal, axis=1)
    keep(diagonal[np.arange(n_el), j], eye[0][j])
    return best, direction


def _hessian(criterion: Criterion, theta: np.ndarray, grad: np.ndarray, idx: np.ndarray):
    """Forward differences of the gradient (symmetrised), upwards so bounds are respected."""
    k = theta.shape[1]
    hess = np.empty((theta.shape[0], k, k))
    steps = (
        1e-6 * np.maximum(np.abs(theta), 1e-2)
        if criterion.analytic
        else (1e-4 * np.maximum(np.abs(theta), 1e-2))
    )
    for j in range(k):
        shifted = theta.copy()
        shifted[:, j] += steps[:, j]
        hess[:, :, j] = (criterion(shifted, idx)["grad"] - grad) / steps[:, j, None]
    return (hess + hess.transpose(0, 2, 1)) / 2


def _newton_step(hess: np.ndarray, grad: np.ndarray, at_bound: np.ndarray) -> np.ndarray:
    """The quasi-Newton direction on the free parameters (``hess`` positive definite)."""
    k = grad.shape[1]
    free = ~at_bound
    h = np.where(free[:, :, None] & free[:, None, :], hess, 0.0)
    h = h + np.where(at_bound, 1.0, 0.0)[:, :, None] * np.eye(k)[None]
    g = np.where(free, grad, 0.0)
    try:
        step = np.linalg.solve(h, g[..., None])[..., 0]
    except np.linalg.LinAlgError:  # a BFGS update singular to rounding: least squares
        step = np.einsum("eij,ej->ei", np.linalg.pinv(h, hermitian=True), g)
    return np.where(free, -step, 0.0)


def _escape(direction, theta, grad, lower) -> np.ndarray:
    """A step along a direction of negative curvature (``_curvature``), with the sign that
    the bounds cut least (near theta = 0 a free diagonal of 1e-28 is as good as at its bound:
    the other sign would be projected back onto it), else the one that is downhill."""
    size = 0.1 * np.maximum(1.0, np.abs(theta).max(axis=1))[:, None]

    def cut(d):
        return np.abs(np.maximum(theta + size * d, lower) - (theta + size * d)).sum(axis=1)

    forward, backward = cut(direction), cut(-direction)
    downhill = np.einsum("ek,ek->e", grad, direction) <= 0
    flip = (backward < forward) | ((backward == forward) & ~downhill)
    return np.where(flip[:, None], -direction, direction) * size


def _line_search(criterion, theta, dev, grad, step, lower, idx, strict=None, max_halvings=40):
    """Backtracking (Armijo) along the projected path; returns the accepted points. Off a
    saddle (``strict``), only a decrease beyond the criterion's rounding is a step."""
    n_el = theta.shape[0]
    new_theta, new_dev = theta.copy(), dev.copy()
    new_grad = np.zeros_like(grad)
    accepted = np.zeros(n_el, dtype=bool)
    alpha = np.ones(n_el)
    todo = np.arange(n_el)
    for _ in range(max_halvings):
        if not todo.size:
            break
        trial = np.maximum(theta[todo] + alpha[todo, None] * step[todo], lower)
        moved = trial - theta[todo]
        state = criterion(trial, idx[todo])
        decrease = np.einsum("ek,ek->e", grad[todo], moved)
        roundoff = 1e-14 * np.abs(dev[todo])  # the criterion's own rounding noise
        if strict is not None:
            roundoff = np.where(strict[todo], -roundoff, roundoff)
        ok = (
            np.isfinite(state["dev"])
            & (state["dev"] <= dev[todo] + 1e-4 * np.minimum(decrease, 0) + roundoff)
            & (np.abs(moved).max(axis=1) > 0)
        )
        good = todo[ok]
        new_theta[good], new_dev[good] = trial[ok], state["dev"][ok]
        new_grad[good] = state["grad"][ok]
        accepted[good] = True
        todo = todo[~ok]
        alpha[todo] /= 2
    return new_theta, new_dev, new_grad, accepted


def _fallback(criterion: Criterion, theta: np.ndarray, start: np.ndarray, lower, e: int):
    idx = np.array([e])

    def fun(t):
        state = criterion(t[None], idx)
        value = state["dev"][0]
        if not np.isfinite(value):
            return 1e300, np.zeros_like(t)
        return value, state["grad"][0]

    bounds = [(lo if np.isfinite(lo) else None, None) for lo in lower]
    best = None
    for x0 in (theta, start, np.where(np.isfinite(lower), 1.0, 0.0)):
        res = optimize.minimize(
            fun,
            np.maximum(x0, lower),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"ftol": 1e-15, "gtol": 1e-9, "maxiter": 500},
        )
        if best is None or res.fun < best.fun:
            best = res
    theta, value = _polish(criterion, best.x, best.fun, lower, idx)
    return theta, value, bool(best.success)


def _polish(criterion: Criterion, theta, value, lower, idx, steps: int = 200):
    """Projected Newton steps with a difference Hessian from L-BFGS-B's point, kept while the
    criterion decreases: L-BFGS-B stops up to 1e-6 short along an ill-conditioned valley."""
    t = theta[None].astype(np.float64)
    grad = criterion(t, idx)["grad"]
    for _ in range(steps):
        at_bound = (t <= lower) & (grad >= 0)
        step = _newton_step(_positive(_hessian(criterion, t, grad, idx)), grad, at_bound)
        for alpha in 0.5 ** np.arange(30):
            trial = np.maximum(t + alpha * step, lower)
            state = criterion(trial, idx)
            if state["dev"][0] < value:
                break
        else:
            break
        t, value, grad = trial, state["dev"][0], state["grad"]
    return t[0], value


def _check_boundary(criterion: Criterion, theta, dev, lower) -> None:
    """lme4's ``check.boundary``: a parameter within 1e-5 of its bound is set to the bound
    where that does not raise the criterion."""
    near = (theta - lower > 0) & (theta - lower < BOUNDARY_TOL)
    for j in range(theta.shape[1]):
        rows = np.flatnonzero(near[:, j])
        if not rows.size:
            continue
        trial = theta[rows].copy()
        trial[:, j] = lower[j]
        value = criterion(trial, rows, grad=False)["dev"]
        better = value < dev[rows]
        theta[rows[better]] = trial[better]
        dev[rows[better]] = value[better]


# --------------------------------------------------------------------------------------------
# lme4's and lmerTest's outputs


def summarise(criterion: Criterion, optimum: Optimum, idx: np.ndarray | None = None) -> dict:
    """Estimates, vcov, sigma, Satterthwaite df, t and p at the optimum (elements ``idx``)."""
    idx = np.arange(optimum.theta.shape[0]) if idx is None else idx
    theta = optimum.theta
    state = criterion(theta, idx, grad=False)
    nu, p, k = criterion.nu, criterion.p, criterion.k
    sigma2 = state["r2"] / nu
    sigma = np.sqrt(sigma2)
    ginv = state["ginv"] = _cho_inverse(state["chol"])
    vcov = sigma2[:, None, None] * ginv
    zero = np.zeros_like(sigma2)
    dldl2 = criterion.gradient(theta, idx, state, zero, reml=False)[0]
    dr2 = criterion.gradient(theta, idx, state, np.ones_like(sigma2), reml=False)[0] - dldl2
    _, dg = criterion.gradient(theta, idx, state, zero, reml=False, full=True)
    # Hessian of lmerTest's devfun_vp(theta, sigma) at the optimum
    hess = np.empty((theta.shape[0], k + 1, k + 1))
    hess[:, :k, :k] = _theta_hessian(criterion, theta, idx, sigma2)
    hess[:, :k, k] = hess[:, k, :k] = -2 * dr2 / sigma[:, None] ** 3
    hess[:, k, k] = 6 * state["r2"] / sigma2**2 - 2 * nu / sigma2
    finite = np.isfinite(hess).all(axis=(1, 2))  # else no df (NaN), never an error
    values, vectors = np.linalg.eigh(np.where(finite[:, None, None], hess, np.eye(k + 1)))
    values = np.where(finite[:, None], values, np.nan)
    positive = values > EIGEN_TOL
    inv_values = np.where(positive, 1 / np.where(positive, values, 1), 0.0)
    vcov_varpar = 2 * np.einsum("eij,ej,ekj->eik", vectors, inv_values, vectors)
    # Jacobian of vcov(beta) = sigma^2 G^-1: d/dtheta_j = -sigma^2 G^-1 dG_j G^-1, d/dsigma
    jac = np.empty((theta.shape[0], k + 1, p))
    diag_d = -sigma2[:, None, None] * np.einsum("epq,ejqr,erp->ejp", ginv, dg, ginv)
    jac[:, :k] = diag_d
    jac[:, k] = 2 * sigma[:, None] * np.diagonal(ginv, axis1=1, axis2=2)
    var = np.diagonal(vcov, axis1=1, axis2=2)
    denom = np.einsum("eip,eij,ejp->ep", jac, vcov_varpar, jac)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(finite[:, None], 2 * var**2 / denom, np.nan)
        se = np.sqrt(var)
        t = state["fixef"] / se
    p_value = 2 * special.stdtr(df, -np.abs(t))
    npar = p + k + 1
    dev = state["dev"]
    return {
        "beta": state["fixef"],
        "se": se,
        "df": df,
        "t": t,
        "p": p_value,
        "sigma": sigma,
        "dev": dev,
        "logLik": -dev / 2,
        "AIC": dev + 2 * npar,
        "BIC": dev + np.log(criterion.n) * npar,
    }


def _theta_hessian(criterion: Criterion, theta, idx, sigma2) -> np.ndarray:
    """d2/dtheta2 of log|L|^2 (+ log|R_X|^2) + r^2 / sigma^2 at fixed sigma, by central
    differences of its gradient (exact derivatives for OneFactor, differences otherwise)."""
    k = theta.shape[1]
    hess = np.empty((theta.shape[0], k, k))
    steps = (
        1e-5 * np.maximum(np.abs(theta), 1e-2)
        if criterion.analytic
        else (2e-4 * np.maximum(np.abs(theta), 1e-2))
    )

    def gradient(t):
        state = criterion(t, idx, grad=False)
        state["ginv"] = _cho_inverse(state["chol"])
        return criterion.gradient(t, idx, state, 1 / sigma2)[0]

    for j in range(k):
        shift = np.zeros_like(theta)
        shift[:, j] = steps[:, j]
        hess[:, :, j] = (gradient(theta + shift) - gradient(theta - shift)) / (
            2 * steps[:, j, None]
        )
    return (hess + hess.transpose(0, 2, 1)) / 2


def varcorr(theta: np.ndarray, sigma: np.ndarray, tmap: np.ndarray):
    """Standard deviations (E, q) and correlations (E, q, q) of one term (lme4's VarCorr)."""
    t = lower_t(theta, tmap)
    cov = np.einsum("eij,ekj->eik", t, t) * (sigma**2)[:, None, None]
    sd = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    with np.errstate(divide="ignore", invalid="ignore"):
        cor = cov / (sd[:, :, None] * sd[:, None, :])
    return sd, cor


def singular(theta: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """lme4's isSingular: a diagonal parameter (lower bound 0) below 1e-4."""
    diagonal = lower == 0
    return (theta[:, diagonal] < SINGULAR_TOL).any(axis=1)


def standardiser(z: np.ndarray) -> np.ndarray:
    """C (q, q) such that Z C has, beside an intercept column, centred unit-variance columns
    (without an intercept: unit root mean square). The model is the same (b = C b~, so
    Sigma = C Sigma~ C'): only the optimiser's coordinates change, which makes the profiled
    deviance of uncentred slopes (age in years beside an intercept) far better conditioned."""
    q = z.shape[1]
    c = np.eye(q)
    ones = [a for a in range(q) if np.all(z[:, a] == 1)]
    for a in range(q):
        if a in ones:
            continue
        if ones:
            mean = z[:, a].mean()
            spread = np.sqrt(((z[:, a] - mean) ** 2).mean())
            if spread > 0:
                c[a, a] = 1 / spread
                c[ones[0], a] = -mean / spread
        else:
            rms = np.sqrt((z[:, a] ** 2).mean())
            if rms > 0:
                c[a, a] = 1 / rms
    return c


def lme4_theta(theta: np.ndarray, tmaps: list[np.ndarray], standard: list[np.ndarray]):
    """lme4's theta (lower Cholesky factors of each term's Sigma / sigma^2, diagonal >= 0)
    from the optimiser's, whose terms' columns were multiplied by ``standard``."""
    out = np.zeros_like(theta)
    for tmap, c in zip(tmaps, standard, strict=True):
        factor = np.einsum("ij,ejk->eik", c, lower_t(theta, tmap))  # C T~: (C T~)(C T~)' = Sigma
        _, upper = np.linalg.qr(factor.transpose(0, 2, 1))
        signs = np.where(np.diagonal(upper, axis1=1, axis2=2) < 0, -1.0, 1.0)
        t = (upper * signs[:, :, None]).transpose(0, 2, 1)  # lower, T T' = Sigma
        rows, cols = np.nonzero(tmap >= 0)
        out[:, tmap[rows, cols]] = t[:, rows, cols]
    return out

"""Gaussian additive models for many responses that share one design: mgcv's ``gam`` fit and
``summary.gam`` statistics, vectorised across elements.

The design X, the penalties and every matrix that depends on them are computed once per set of
subjects. With X = QR and y~ = Q'y, a fit with smoothing parameters lambda is

    beta~ = A^-1 y~,  A = I + sum_j lambda_j R^-T S_j R^-1,  beta = R^-1 beta~,

so each element only needs p-vectors and p x p matrices (p = number of coefficients). Each
element's smoothing parameters are chosen by ports of mgcv's own optimisers (``newton`` for
REML, the C ``magic`` for GCV.Cp), from mgcv's start (``initial.sp``) and with its stopping
rules: where the score is flat only mgcv's path gives mgcv's numbers. Every statistic is then
computed for all elements at once (``summarise``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import special

from greyarray.stats.davies import psum_chisq
from greyarray.stats.linalg import column_norms

EPS = np.finfo(float).eps


@dataclass
class SmoothBlock:
    """Columns of one smooth term in the design, its penalty and what its test needs."""

    label: str  # mgcv's label, e.g. "s(age)", "s(age):osexM", "te(age,edu)"
    cols: slice
    S: tuple[np.ndarray, ...]  # penalties on the block (te: one per margin; fx = TRUE: none)
    retest: bool  # penalised without null space (ts/cs): summary.gam tests it with reTest
    deriv: np.ndarray | None = None  # (n, k) d/dx of the block's columns at the data


@dataclass
class Design:
    """Everything about one set of subjects that does not depend on the response."""

    X: np.ndarray  # (n, p)
    param_cols: slice
    smooths: list[SmoothBlock]
    intercept: bool
    Q: np.ndarray = field(init=False)
    R: np.ndarray = field(init=False)
    Rinv: np.ndarray = field(init=False)
    penalties: list[tuple[slice, np.ndarray]] = field(init=False)  # (columns, S_j) per penalty
    St: list[np.ndarray] = field(init=False)  # R^-T S_j R^-1 (p x p) per penalty
    Lt: list[np.ndarray] = field(init=False)  # (r_j x p): St_j = Lt_j' Lt_j
    log_det: PenaltyLogDet = field(init=False)  # log|sum_j lambda_j S_j|+ and derivatives
    log_det_R: float = field(init=False)
    Mp: int = field(init=False)
    rho0: np.ndarray = field(init=False)
    col_sums: np.ndarray = field(init=False)
    ok: bool = field(init=False)
    eigen_s: np.ndarray = field(init=False)
    eigen_U: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n, p = self.X.shape
        self.Q, self.R = np.linalg.qr(self.X)
        diag = np.abs(np.diag(self.R))
        norms = column_norms(self.X)
        self.ok = bool(n > p and (diag > 1e-7 * np.maximum(norms, 1e-300)).all())
        if not self.ok:
            return
        self.Rinv = np.linalg.inv(self.R)
        self.log_det_R = float(np.log(diag).sum())
        self.col_sums = self.X.sum(axis=0)
        self.penalties = [(block.cols, S) for block in self.smooths for S in block.S]
        self.Lt, self.St, roots, log_dets = [], [], [], []
        for cols, S in self.penalties:
            values, vectors = np.linalg.eigh(S)
            keep = values > values.max() * EPS**0.75
            root = np.sqrt(values[keep])[:, None] * vectors[:, keep].T  # S = root' root
            Lt = root @ self.Rinv[cols]  # R^-T S R^-1 = Lt' Lt, exactly rank r
            self.Lt.append(Lt)
            self.St.append(Lt.T @ Lt)
            roots.append(root)
            log_dets.append(float(np.log(values[keep]).sum()))
        self.log_det = PenaltyLogDet(self.smooths, roots, log_dets)
        self.Mp = p - self.log_det.rank
        self.rho0 = np.log(initial_sp(self.X, self.penalties))
        if len(self.St) == 1:  # one penalty: its eigenbasis makes A diagonal; exact zeros
            _, sv, vt = np.linalg.svd(self.Lt[0], full_matrices=True)
            self.eigen_s = np.zeros(p)
            self.eigen_s[: sv.size] = sv**2
            self.eigen_U = vt.T

    def term_factor(self, block: SmoothBlock) -> np.ndarray:
        """W = R_t R^-1[block]: maps y~-space coefficients to testStat's rotated ones, where
        R_t is the R factor of the block's own columns (summary.gam's X = object$R)."""
        Rt = np.linalg.qr(self.X[:, block.cols], mode="r")
        return Rt @ self.Rinv[block.cols]


class PenaltyLogDet:
    """log|S_lambda|+ for S_lambda = sum_j lambda_j S_j, with its first and second derivatives
    in log lambda, as REML needs them (gam.fit3's ``gam.reparam``). A smooth with one penalty
    adds r_j log lambda_j + log|S_j|+; a smooth with several (te, ti) adds the log determinant
    of their sum on its range space (``totalPenaltySpace``), computed as mgcv's C
    ``get_stableS`` computes it: dominant terms are split off one after another by similarity
    transforms, so that no term leaks into the null space of another however different the
    smoothing parameters are. Penalties of different smooths act on disjoint columns."""

    def __init__(self, smooths: list[SmoothBlock], roots: list[np.ndarray], log_dets: list[float]):
        """``roots[j]``: R_j with S_j = R_j'R_j (rank rows); ``log_dets[j]``: log|S_j|+."""
        self.groups: list[tuple[list[int], float | tuple]] = []
        self.ranks = np.zeros(len(roots))
        self.rank = 0
        j = 0
        for block in smooths:
            idx = list(range(j, j + len(block.S)))
            j += len(block.S)
            if len(idx) == 1:
                self.ranks[idx[0]] = roots[idx[0]].shape[0]
                self.groups.append((idx, log_dets[idx[0]]))
                self.rank += roots[idx[0]].shape[0]
            elif idx:
                total = sum(S / np.sqrt(np.sum(S * S)) for S in block.S)
                values, vectors = np.linalg.eigh(total)
                Y = vectors[:, values > values.max() * EPS**0.66]
                rS = [Y.T @ roots[i].T for i in idx]
                self.groups.append((idx, (rS, [r @ r.T for r in rS])))
                self.rank += Y.shape[1]

    def __call__(self, rho: np.ndarray, deriv: bool):
        m = rho.size
        det, det1, det2 = 0.0, np.zeros(m), np.zeros((m, m))
        for idx, part in self.groups:
            if isinstance(part, float):
                det += self.ranks[idx[0]] * rho[idx[0]] + part
                det1[idx[0]] = self.ranks[idx[0]]
                continue
            d, d1, d2 = stable_log_det(part[0], np.exp(rho[idx]), deriv, part[1])
            det += d
            if deriv:
                det1[idx] = d1
                det2[np.ix_(idx, idx)] = d2
        return det, det1, det2


def stable_log_det(rS: list[np.ndarray], sp: np.ndarray, deriv: bool, Si=None):
    """mgcv's C ``get_stableS`` (no fixed penalty): log|sum_i sp_i rS_i rS_i'| (full rank q),
    its gradient and Hessian in log sp (``Si``: the rS_i rS_i', if already at hand)."""
    q = rS[0].shape[0]
    Si = [r @ r.T for r in rS] if Si is None else list(Si)
    rS = [r.copy() for r in rS]
    d_tol, r_tol = EPS**0.3, EPS**0.75
    S = np.zeros((q, q))
    K, Q = 0, q
    gamma = np.ones(len(rS), bool)
    first = True
    while True:
        frob = np.array(
            [np.sqrt(np.sum(M * M)) if g else 0.0 for M, g in zip(Si, gamma, strict=True)]
        )
        max_frob = float((frob * sp)[gamma].max())
        alpha = gamma & (frob * sp > max_frob * d_tol)
        gamma1 = gamma & ~alpha
        if gamma1.any():
            ev = np.linalg.eigvalsh(sum(Si[i] / frob[i] for i in np.flatnonzero(alpha)))
            r = 1
            while r < Q and ev[Q - r - 1] > ev[Q - 1] * r_tol:
                r += 1
        else:
            r = Q
        if r == Q:
            if first:
                S = sum(sp[i] * Si[i] for i in range(len(Si)))
            break
        ev, U = np.linalg.eigh(sum(sp[i] * Si[i] for i in np.flatnonzero(alpha)))
        ev, U = ev[::-1], U[:, ::-1]
        Sg = sum((sp[i] * Si[i] for i in np.flatnonzero(gamma1)), np.zeros((Q, Q)))
        if K > 0:
            S[:K, K:] = S[:K, K:] @ U
            S[K:, :K] = S[:K, K:].T
        C = U.T @ Sg @ U
        C[np.arange(r), np.arange(r)] += ev[:r]
        S[K:, K:] = C
        for i in range(len(rS)):
            if alpha[i]:
                rS[i][K : K + r] = U[:, :r].T @ rS[i][K:]
                rS[i][K + r :] = 0.0
            elif gamma1[i]:
                rS[i][K:] = U.T @ rS[i][K:]
        Un = U[:, r:]
        for i in np.flatnonzero(gamma1):
            Si[i] = Un.T @ Si[i] @ Un
        K, Q, gamma, first = K + r, Q - r, gamma1, False
    R = np.linalg.qr(S, mode="r")
    det = float(np.log(np.abs(np.diag(R))).sum())
    if not deriv:
        return det, None, None
    B = np.linalg.inv(S)
    det1 = np.array([sp[i] * np.sum(r * (B @ r)) for i, r in enumerate(rS)])
    BS = [B @ (r @ r.T) for r in rS]
    det2 = -np.outer(sp, sp) * np.array([[np.sum(a * b.T) for b in BS] for a in BS])
    det2[np.diag_indices(len(rS))] += det1
    return det, det1, det2


def initial_sp(X: np.ndarray, penalties: list[tuple[slice, np.ndarray]]) -> np.ndarray:
    """mgcv's ``initial.sp(X, S, off)`` (its starting smoothing parameters)."""
    if not penalties:
        return np.zeros(0)
    ldxx = (X * X).sum(axis=0)
    ldss = np.zeros_like(ldxx)
    pen = np.zeros(ldxx.size, bool)
    sp = np.zeros(len(penalties))
    for i, (cols, S) in enumerate(penalties):
        absS = np.abs(S)
        thresh = EPS**0.8 * absS.max()
        ind = (absS.mean(axis=1) > thresh) & (absS.mean(axis=0) > thresh) & (np.diag(absS) > thresh)
        xx = ldxx[cols][ind]
        sp[i] = xx.mean() / np.diag(S)[ind].mean()
        idx = np.arange(X.shape[1])[cols]
        pen[idx] |= ind
        ldss[idx] += sp[i] * np.diag(S)
    ind = (ldss > 0) & pen & (ldxx > 0)
    lx, ls = ldxx[ind], ldss[ind]
    while np.mean(lx / (lx + ls)) > 0.4:
        sp, ls = sp * 10, ls * 10
    while np.mean(lx / (lx + ls)) < 0.4:
        sp, ls = sp / 10, ls / 10
    return sp


# --- smoothing parameter selection: mgcv's newton() ----------------------------------------


@dataclass
class Score:
    """gam.fit3's output that newton() uses: the score, its derivatives, the scale estimate."""

    value: float
    grad: np.ndarray | None
    hess: np.ndarray | None
    scale_est: float


class Evaluator:
    """The REML or GCV score of one element as a function of log smoothing parameters (and, for
    REML, log scale, which mgcv optimises jointly). Works in y~-space; when there is one
    penalty, in the eigenbasis of R^-T S R^-1, where A is diagonal."""

    def __init__(self, design: Design, yt: np.ndarray, rss0: float, n: int, method: str):
        self.d, self.rss0, self.n, self.reml = design, rss0, n, method == "REML"
        if len(design.St) == 1:
            self.s = design.eigen_s
            self.z = design.eigen_U.T @ yt
            self.zz = self.z * self.z
        else:
            self.s = None
            self.yt = yt

    def __call__(self, lsp: np.ndarray, deriv: bool) -> Score:
        m = len(self.d.St)
        rho = lsp[:m]
        parts = self._diag(rho, deriv) if self.s is not None else self._dense(rho, deriv)
        Dp, Dp1, Dp2, logdetA, tr1, tr2, D, D1, D2, tau, tau1, tau2 = parts
        n = self.n
        scale_est = D / (n - tau)
        if not self.reml:
            nt = n - tau
            value = n * D / nt**2
            if not deriv:
                return Score(value, None, None, scale_est)
            grad = n * (D1 / nt**2 + 2 * D * tau1 / nt**3)
            hess = n * (
                D2 / nt**2
                + 2 * (np.outer(D1, tau1) + np.outer(tau1, D1)) / nt**3
                + 2 * D * tau2 / nt**3
                + 6 * D * np.outer(tau1, tau1) / nt**4
            )
            return Score(value, grad, hess, scale_est)
        phi = math.exp(lsp[m])
        Mp = self.d.Mp
        det, det1, det2 = self.d.log_det(rho, deriv)
        value = (
            Dp / (2 * phi)
            + (n - Mp) / 2 * math.log(2 * math.pi * phi)
            + self.d.log_det_R
            + logdetA / 2
            - det / 2
        )
        if not deriv:
            return Score(value, None, None, scale_est)
        grad = np.empty(m + 1)
        grad[:m] = Dp1 / (2 * phi) + tr1 / 2 - det1 / 2
        grad[m] = -Dp / (2 * phi) + (n - Mp) / 2
        hess = np.empty((m + 1, m + 1))
        hess[:m, :m] = Dp2 / (2 * phi) + tr2 / 2 - det2 / 2
        hess[:m, m] = hess[m, :m] = -Dp1 / (2 * phi)
        hess[m, m] = Dp / (2 * phi)
        return Score(value, grad, hess, scale_est)

    def _diag(self, rho, deriv):
        """One penalty: A = I + lambda diag(s), everything elementwise."""
        z, zz, ls = self.z, self.zz, math.exp(rho[0]) * self.s
        A = 1 + ls
        q = ls / A  # 1 - 1/A
        qzz = q * zz
        Dp = self.rss0 + float(qzz.sum())
        D = self.rss0 + float((q * qzz).sum())
        tau = float((1 / A).sum())
        logdetA = float(np.log(A).sum())
        if not deriv:
            return Dp, None, None, logdetA, None, None, D, None, None, tau, None, None
        qA = q / A
        Dp1 = float((qA * zz).sum())  # sum ls z^2 / A^2
        Dp2 = Dp1 - 2 * float((q * qA * zz).sum())
        tr1 = float(q.sum())
        tr2 = tr1 - float((q * q).sum())
        D1 = 2 * float((q * qA * zz).sum())  # r . g with r = q z, g = q z / A
        D2 = 2 * float((qA * qA * zz).sum()) + 2 * float((q * qA * zz * (1 - 2 * q)).sum())
        tau1 = -float(qA.sum())
        tau2 = tau1 + 2 * float((q * qA).sum())
        del z
        return (
            Dp, np.array([Dp1]), np.array([[Dp2]]), logdetA, np.array([tr1]),
            np.array([[tr2]]), D, np.array([D1]), np.array([[D2]]), tau,
            np.array([tau1]), np.array([[tau2]]),
        )  # fmt: skip

    def _dense(self, rho, deriv):
        """Several penalties, from the SVD M = U D V' of M = [I; sqrt(lambda_j) Lt_j] (as mgcv's
        magic): with U_j the rows of U of penalty j, A^-1 = V D^-2 V', sqrt(lambda_j) Lt_j beta =
        U_j D^-1 V'y~ and A^-1 B_j = V D^-1 U_j'U_j D V', so every derivative is a product of
        blocks of U: no smoothing parameter multiplies a small number (huge ones stay exact)."""
        lam = np.exp(rho)
        Lt = self.d.Lt
        p = Lt[0].shape[1]
        M = np.vstack([np.eye(p)] + [math.sqrt(lam[j]) * L for j, L in enumerate(Lt)])
        U, d, vt = np.linalg.svd(M, full_matrices=False)
        yt = self.yt
        z = (vt @ yt) / d
        beta = vt.T @ (z / d)
        r = yt - beta
        Dp = self.rss0 + float(yt @ r)
        D = self.rss0 + float(r @ r)
        tau = float(np.sum(d**-2))
        logdetA = float(2 * np.log(d).sum())
        if not deriv:
            return Dp, None, None, logdetA, None, None, D, None, None, tau, None, None
        m = len(Lt)
        edges = np.cumsum([p] + [L.shape[0] for L in Lt])
        # P_j = U_j'U_j: A^-1 B_j = V D^-1 P_j D V', so every trace and product below is one
        P = np.stack([U[edges[j] : edges[j + 1]].T @ U[edges[j] : edges[j + 1]] for j in range(m)])
        flat = P.reshape(m, -1)
        W = P @ z  # (m, p): P_j z, with sqrt(lambda_j) Lt_j beta = U_j z
        G = (W / d) @ vt  # rows g_j = A^-1 B_j beta = V D^-1 P_j z
        Ps = P @ ((vt @ r) / d)  # rows P_j D^-1 V'r
        Dp1 = W @ z
        tr1 = np.trace(P, axis1=1, axis2=2)
        D1 = 2 * (G @ r)
        tau1 = -(np.diagonal(P, axis1=1, axis2=2) / d**2).sum(axis=1)
        X = W @ Ps.T  # [j, k]: r'A^-1 B_k g_j
        Dp2 = np.diag(Dp1) - 2 * (W @ W.T)
        tr2 = np.diag(tr1) - flat @ flat.T
        D2 = 2 * (G @ G.T) + np.diag(D1) - 2 * (X + X.T)
        tau2 = np.diag(tau1) + 2 * (flat @ (P / d[:, None] ** 2).reshape(m, -1).T)
        tau2 = (tau2 + tau2.T) / 2
        return Dp, Dp1, Dp2, logdetA, tr1, tr2, D, D1, D2, tau, tau1, tau2


def mgcv_newton(
    ev: Evaluator, lsp: np.ndarray, conv_tol=1e-6, max_nstep=5.0, max_sstep=2.0, max_half=30
) -> tuple[np.ndarray, float]:
    """mgcv 1.8-41's ``newton()`` (gam.control defaults), statement by statement, for one
    element: the same start, steps, step halving, steepest-descent fallback and convergence
    test, so that it stops where mgcv stops. Returns (log parameters, final score)."""
    reml = ev.reml
    sqrt_eps = math.sqrt(EPS)
    b = ev(lsp, True)
    score = old_score = b.value
    grad, hess = b.grad, b.hess

    def scale_of(fit: Score, value: float) -> float:
        return (abs(math.log(fit.scale_est)) if reml else abs(fit.scale_est)) + abs(value)

    score_scale = scale_of(b, score)
    uconv = np.abs(grad) > score_scale * conv_tol
    if not uconv.any():
        uconv[:] = True
    qthresh = 0.8
    ii = 0
    score2 = math.nan
    for i in range(1, 201):
        if not uconv.any():
            uconv[np.abs(grad) == np.abs(grad).max()] = True
        d, U = np.linalg.eigh(hess[np.ix_(uconv, uconv)])
        d, U = d[::-1].copy(), U[:, ::-1]
        indef = bool((-d > abs(d[0]) * sqrt_eps).any())
        if indef and d.size == 1:
            indef = bool(d[0] < -score_scale * sqrt_eps)
        pdef = not (d < 0).any()
        d = np.abs(d)
        low_d = d.max() * EPS**0.7
        if (d < low_d).any():
            pdef = False
        d[d < low_d] = low_d
        d[d != 0] = 1 / d[d != 0]
        nstep = np.zeros_like(grad)
        nstep[uconv] = -(U @ (d * (U.T @ grad[uconv])))
        sstep = -grad / np.abs(grad).max()
        ms = np.abs(nstep).max()
        if ms > max_nstep:
            nstep = max_nstep * nstep / ms
        sd_unused = True
        lsp1 = lsp + nstep
        b = ev(lsp1, pdef)
        pred_change = grad @ nstep + 0.5 * nstep @ hess @ nstep
        score1 = b.value
        ii = 0
        score_change = score1 - score
        qerror = abs(pred_change - score_change) / (
            max(abs(pred_change), abs(score_change)) + score_scale * conv_tol
        )
        if math.isfinite(score1) and score_change < 0 and pdef and qerror < qthresh:
            old_score, lsp, score, grad, hess = score, lsp1, b.value, b.grad, b.hess
        elif not math.isfinite(score1) or score1 >= score or qerror >= qthresh:
            step = nstep
            while (
                not math.isfinite(score1) or score1 >= score or qerror >= qthresh
            ) and ii < max_half:
                if ii == 3 and i < 10:
                    s_length = min(math.sqrt(step @ step), max_sstep)
                    step = sstep * s_length / math.sqrt(sstep @ sstep)
                    sd_unused = False
                else:
                    step = step / 2
                lsp1 = lsp + step
                b1 = ev(lsp1, False)
                pred_change = grad @ step + 0.5 * step @ hess @ step
                score1 = b1.value
                score_change = score1 - score
                if ii > min(4, max_half / 2):
                    qerror = qthresh / 2
                else:
                    qerror = abs(pred_change - score_change) / (
                        max(abs(pred_change), abs(score_change)) + score_scale * conv_tol
                    )
                if math.isfinite(score1) and score_change < 0 and qerror < qthresh:
                    if pdef or not sd_unused:
                        b = ev(lsp1, True)
                        old_score, lsp, score, grad, hess = score, lsp1, b.value, b.grad, b.hess
                    else:
                        b = b1
                        score2 = score1
                    score1 = score - abs(score) - 1
                if not math.isfinite(score1) or score1 >= score or qerror >= qthresh:
                    ii += 1
            if not pdef and sd_unused and ii < max_half:
                score1 = score2
        if not pdef and sd_unused:
            step = sstep * 2
            kk = 0
            score2 = math.nan
            lsp2 = lsp
            while True:
                step = step / 2
                kk += 1
                lsp3 = lsp + step
                b1 = ev(lsp3, False)
                pred_change = grad @ step + 0.5 * step @ hess @ step
                score3 = b1.value
                score_change = score3 - score
                qerror = abs(pred_change - score_change) / (
                    max(abs(pred_change), abs(score_change)) + score_scale * conv_tol
                )
                if not math.isfinite(score2) or (
                    math.isfinite(score3) and score3 <= score2 and qerror < qthresh
                ):
                    score2, lsp2 = score3, lsp3
                if (
                    math.isfinite(score2)
                    and math.isfinite(score3)
                    and score2 < score
                    and score3 > score2
                ) or kk == 40:
                    break
            if math.isfinite(score2) and score2 < score1:
                lsp1, score1 = lsp2, score2
            b = ev(lsp1, True)
            old_score, lsp, score, grad, hess = score, lsp1, b.value, b.grad, b.hess
        converged = not indef
        score_scale = scale_of(b, score)
        grad2 = np.diag(hess)
        uconv = (np.abs(grad) > score_scale * conv_tol * 0.1) | (
            np.abs(grad2) > score_scale * conv_tol * 0.1
        )
        if (np.abs(grad) > score_scale * conv_tol * 5).any():
            converged = False
        if abs(old_score - score) > score_scale * conv_tol:
            if converged:
                uconv[:] = True
            converged = False
        if ii == max_half:
            converged = True
        if converged:
            break
    return lsp, score, hess


def mgcv_magic(ev: Evaluator, sp0: np.ndarray, tol=1e-7, max_half=15) -> tuple[np.ndarray, float]:
    """mgcv 1.8-41's C ``magic()`` optimiser, which ``gam`` uses for GCV.Cp with a gaussian
    additive model (its performance iteration: one call), statement by statement: Newton with
    step halving backed by steepest descent, its convergence test, then up to five steps of 2
    in each log smoothing parameter towards +-infinity while the score keeps falling."""
    sp0 = sp0.copy()
    mp = sp0.size
    min_score = ev(sp0, False).value
    grad = np.zeros(mp)
    n_step = np.zeros(mp)
    sd_step = np.zeros(mp)
    use_sd = False
    d_score = 1e10
    iteration = 0
    while True:
        iteration += 1
        if iteration > 400:
            break
        ok = iteration > 1
        tries = 0
        step = sd_step if use_sd else n_step
        while ok:
            tries += 1
            if tries == 4 and not use_sd:
                use_sd = True
                step = sd_step
            nsp = sp0 + step
            score = ev(nsp, False).value
            if score < min_score:
                ok = False
                d_score = min_score - score
                min_score = score
                sp0 = nsp
            else:
                step /= 2
            if tries == max_half - 1 and ok:
                step[:] = 0.0
            if tries == max_half:
                ok = False
        converged = False
        if iteration > 3:
            converged = True
            if d_score > tol * (1 + min_score):
                converged = False
            if math.sqrt(grad @ grad) > tol ** (1 / 3) * (1 + abs(min_score)):
                converged = False
            if tries == max_half:
                converged = True
        fit = ev(sp0, True)
        grad, hess = fit.grad, fit.hess
        ev_h, U = np.linalg.eigh(hess)
        use_sd = bool((ev_h < 0).any())
        if not use_sd:
            n_step = -(U @ ((U.T @ grad) / ev_h))
            longest = np.abs(n_step).max()
            if longest > 5.0:
                n_step = n_step * (5.0 / longest)
        sd_step = -grad / np.abs(grad).max()
        if converged:
            break
    for k in range(mp):  # are optima at +-infinity?
        sign = 1.0 if grad[k] < 0.0 else -1.0
        for _ in range(5):
            sp0[k] += sign * 2.0
            score = ev(sp0, False).value
            if score < min_score:
                min_score = score
            else:
                sp0[k] -= sign * 2.0
                break
    return sp0, ev(sp0, False).value


def fit_smoothing(design: Design, yt, rss0, y_null_scale, n, method):
    """Smoothing parameters (b, m), mgcv's final score (b,) and, for REML, the final Hessian
    of the score in (log lambda, log scale) (b, m + 1, m + 1) for every element."""
    b, m = yt.shape[0], len(design.St)
    rho = np.zeros((b, m))
    scores = np.full(b, np.nan)
    hess = np.full((b, m + 1, m + 1), np.nan) if method == "REML" else None
    if m == 0:
        return rho, scores, None
    for e in range(b):
        ev = Evaluator(design, yt[e], float(rss0[e]), n, method)
        try:
            with np.errstate(all="ignore"):
                if method == "REML":
                    lsp = np.append(design.rho0, math.log(y_null_scale[e] / 10))
                    lsp, scores[e], hess[e] = mgcv_newton(ev, lsp)
                else:
                    lsp, scores[e] = mgcv_magic(ev, design.rho0)
            rho[e] = lsp[:m]
        except (ValueError, ZeroDivisionError, OverflowError, np.linalg.LinAlgError):
            rho[e] = np.nan  # mgcv would stop (ModelArray's on_error = "stop"); we leave NaN
    return rho, scores, hess


def edf2_total(design: Design, rho, hess, beta, scale, edf1_total) -> np.ndarray:
    """sum(edf2): mgcv's edf corrected for smoothing parameter uncertainty
    (``gam.fit3.post.proc`` with REML; logLik's df and so AIC/BIC use it). Vc = Vb + Vc1 + Vc2
    with Vc1 = db/drho Vrho db/drho' from the inverse REML Hessian and Vc2 the second-order
    ``Vb.corr`` term from the derivatives of the Cholesky factor; edf2 = diag(Vc X'X)/scale."""
    b, m = rho.shape
    p = design.R.shape[0]
    XtX = design.R.T @ design.R
    lam = np.exp(rho)
    dH = []
    for j, (cols, S) in enumerate(design.penalties):
        full = np.zeros((p, p))
        full[cols, cols] = S
        dH.append(lam[:, j, None, None] * full)
    H = XtX + sum(dH)
    values, vectors = np.linalg.eigh(hess)
    pos = values > 0
    root = np.where(pos, 1 / np.sqrt(np.where(pos, values, 1)), 0.0)
    rV = (root[:, :, None] * np.swapaxes(vectors, 1, 2))[:, :, :m]  # (b, m+1, m)
    reg = 1 / np.sqrt(np.where(pos, values, 0) + 0.1)
    Vr = np.einsum("bik,bk,bjk->bij", vectors, reg**2, vectors)[:, :m, :m]
    total = np.full(b, np.nan)
    for e in range(b):
        try:
            Rc = np.linalg.cholesky(H[e]).T
        except np.linalg.LinAlgError:
            continue
        Rci = np.linalg.inv(Rc)
        Hinv = Rci @ Rci.T
        db = np.stack([-(Hinv @ (d[e] @ beta[e])) for d in dH], axis=1)  # (p, m)
        Vc1 = db @ rV[e].T @ rV[e] @ db.T
        dRi = []
        for d in dH:
            Mj = Rci.T @ d[e] @ Rci
            phi = np.triu(Mj)
            phi[np.diag_indices(p)] /= 2
            dRi.append(-Rci @ (phi @ Rc) @ Rci)
        Vc2 = sum(Vr[e, i, j] * dRi[i] @ dRi[j].T for i in range(m) for j in range(m))
        Vc = scale[e] * Hinv + Vc1 + scale[e] * Vc2
        edf2 = float(np.sum(Vc * XtX)) / scale[e]
        total[e] = min(edf2, edf1_total[e])  # mgcv falls back to edf1 when edf2 exceeds it
    return total


def _solve_parts(design: Design, rho: np.ndarray, yt: np.ndarray):
    """A^-1 and beta~ for a batch: rho (b, m), yt (b, p); stable for huge smoothing
    parameters (eigenbasis for one penalty, SVD of the augmented matrix for several)."""
    lam = np.exp(rho)
    b, p = yt.shape
    if len(design.St) == 1:
        U, s = design.eigen_U, design.eigen_s
        Ai = np.einsum("ik,bk,jk->bij", U, 1 / (1 + lam[:, :1] * s), U)
    else:
        eye = np.broadcast_to(np.eye(p), (b, p, p))
        M = np.concatenate(
            [eye] + [np.sqrt(lam[:, j, None, None]) * L for j, L in enumerate(design.Lt)], axis=1
        )
        _, d, vt = np.linalg.svd(M, full_matrices=False)
        Ai = np.einsum("bki,bk,bkj->bij", vt, 1 / d**2, vt)
    return Ai, None, np.einsum("bij,bj->bi", Ai, yt)


# --- summary.gam -----------------------------------------------------------------------------


@dataclass
class BatchResult:
    """summary.gam / glance statistics of a batch of elements (arrays over elements)."""

    smooth: dict[str, np.ndarray]  # edf, ref.df, statistic, p.value: (b, n_smooth)
    param: dict[str, np.ndarray]  # estimate, std.error, statistic, p.value: (b, n_param)
    model: dict[str, np.ndarray]  # adj.r.squared, dev.expl, ..., sse: (b,)
    slope_sign: np.ndarray  # (b, n_smooth): sign of the mean derivative of each smooth


def summarise(
    design: Design, rho, scores, hess, yt, rss0, ysum, yss_c, nulldev, n, method
) -> BatchResult:
    """Every statistic ModelArray.gam can write, for elements fitted at log(lambda) = rho."""
    if design.St:
        Ai, _, bt = _solve_parts(design, rho, yt)
    else:
        p = yt.shape[1]
        Ai = np.broadcast_to(np.eye(p), (yt.shape[0], p, p))
        bt = yt
    r = yt - bt
    D = rss0 + np.einsum("bi,bi->b", r, r)
    Rinv, R = design.Rinv, design.R
    F_diag = np.einsum("ia,eac,ci->ei", Rinv, Ai, R)
    FF_diag = np.einsum("ia,eac,ci->ei", Rinv, Ai @ Ai, R)
    edf, edf1 = F_diag, 2 * F_diag - FF_diag
    fixed = np.ones(R.shape[0], bool)  # coefficients no penalty touches: edf = edf1 = 1
    for cols, _ in design.penalties:
        fixed[cols] = False
    edf = np.where(fixed, 1.0, edf)
    edf1 = np.where(fixed, 1.0, edf1)
    tau = edf.sum(axis=1)
    res_df = n - tau
    scale = D / res_df
    beta = bt @ Rinv.T
    smooth = _smooth_tests(design, Ai, bt, beta, edf, edf1, scale, res_df, rho)
    pc = design.param_cols
    Rp = Rinv[pc]
    se = np.sqrt(scale[:, None] * np.einsum("ia,eac,ic->ei", Rp, Ai, Rp))
    est = beta[:, pc]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = est / se
    param = {
        "estimate": est,
        "std.error": se,
        "statistic": t,
        "p.value": 2 * special.stdtr(res_df[:, None], -np.abs(t)),
    }
    res_sum = ysum - beta @ design.col_sums
    centred_rss = D - res_sum**2 / n
    loglik = -n / 2 * (np.log(2 * np.pi * D / n) + 1)
    df = tau + 1  # logLik.gam's df: sum(edf) + 1, or sum(edf2) + 1 after REML, at most p + 1
    if hess is not None and design.St:
        edf2 = edf2_total(design, rho, hess, beta, scale, edf1.sum(axis=1))
        df = np.minimum(np.where(np.isnan(edf2), tau, edf2) + 1, R.shape[0] + 1)
    model = {
        "adj.r.squared": 1 - centred_rss * (n - 1) / (yss_c * res_df),
        "dev.expl": (nulldev - D) / nulldev,
        "sp.criterion": scores if design.St else _unpenalised_score(design, n, method, D, tau),
        "scale": scale,
        "df": tau,
        "logLik": loglik,
        "AIC": -2 * loglik + 2 * df,
        "BIC": -2 * loglik + np.log(n) * df,
        "deviance": D,
        "df.residual": res_df,
        "nobs": np.full(D.shape, float(n)),
        "sse": D,
    }
    signs = np.full((D.size, len(design.smooths)), np.nan)
    for i, block in enumerate(design.smooths):
        if block.deriv is not None:  # mean over subjects of the smooth's first derivative
            signs[:, i] = np.sign(beta[:, block.cols] @ block.deriv.mean(axis=0))
    return BatchResult(smooth, param, model, signs)


def _unpenalised_score(design, n, method, D, tau) -> np.ndarray:
    """mgcv's gcv.ubre without smoothing parameters: GCV, or REML at the optimal scale."""
    if method == "GCV.Cp":
        return n * D / (n - tau) ** 2
    nm = n - design.Mp
    return nm / 2 * (1 + np.log(2 * np.pi * D / nm)) + design.log_det_R


def _smooth_tests(design, Ai, bt, beta, edf, edf1, scale, res_df, rho) -> dict[str, np.ndarray]:
    b = bt.shape[0]
    out = {name: np.full((b, len(design.smooths)), np.nan) for name in SMOOTH_STATS}
    lam = np.exp(rho)
    for i, block in enumerate(design.smooths):
        cols = block.cols
        out["edf"][:, i] = edf[:, cols].sum(axis=1)
        if block.retest:
            stat, pval, rank = _re_tests(design, i, Ai, beta, scale, res_df, lam)
        else:
            W = design.term_factor(block)
            V = scale[:, None, None] * np.einsum("ia,eac,jc->eij", W, Ai, W)
            Rp = bt @ W.T
            rank_in = np.minimum(W.shape[0], edf1[:, cols].sum(axis=1))
            stat, pval, rank = test_stat_batch(Rp, V, rank_in, res_df)
        out["ref.df"][:, i] = rank
        out["statistic"][:, i] = stat / rank
        out["p.value"][:, i] = pval
    return out


SMOOTH_STATS = ("edf", "ref.df", "statistic", "p.value")


def test_stat_batch(Rp, V, rank, res_df):
    """mgcv's ``testStat(p, X, V, rank, type = 0, res.df)`` for every element: returns the
    statistic (chi-square form), p-value and rank."""
    V = (V + np.swapaxes(V, 1, 2)) / 2
    values, vectors = np.linalg.eigh(V)
    values, vectors = values[:, ::-1], vectors[:, :, ::-1]
    sign = np.sign(vectors[:, 0, :])
    sign[sign == 0] = 1
    vectors = vectors * sign[:, None, :]
    stat = np.empty(len(Rp))
    pval = np.empty(len(Rp))
    ranks = np.empty(len(Rp))
    for e in range(len(Rp)):
        stat[e], pval[e], ranks[e] = _test_stat(Rp[e], values[e], vectors[e], rank[e], res_df[e])
    return stat, pval, ranks


def _test_stat(Rp, ev, vec, rank, res_df):
    k = max(0, math.floor(rank))
    nu = abs(rank - k)
    k1 = k + 1 if nu > 0 else k
    r_est = int((ev > ev.max() * EPS**0.9).sum())
    if r_est < k1:
        k1 = k = r_est
        nu = 0.0
        rank = float(r_est)
    vec = vec[:, :k1].copy()
    if nu > 0 and k > 0:
        if k > 1:
            vec[:, : k - 1] /= np.sqrt(ev[: k - 1])
        b12 = math.sqrt(max(0.0, 0.5 * nu * (1 - nu)))
        B = np.array([[1.0, b12], [b12, nu]])
        evs = np.diag(ev[k - 1 : k1] ** -0.5)
        B = evs @ B @ evs
        eb_val, eb_vec = np.linalg.eigh(B)
        eb_val, eb_vec = eb_val[::-1], eb_vec[:, ::-1]
        rB = eb_vec @ np.diag(np.sqrt(eb_val)) @ eb_vec.T
        vec1 = vec.copy()
        vec1[:, k - 1 : k1] = (rB @ np.diag([-1.0, 1.0]) @ vec[:, k - 1 : k1].T).T
        vec[:, k - 1 : k1] = (rB @ vec[:, k - 1 : k1].T).T
    else:
        vec = vec * math.sqrt(1 / ev[0]) if k == 0 else vec / np.sqrt(ev[:k])
        vec1 = vec
        if k == 1:
            rank = 1.0
    d = float(((vec.T @ Rp) ** 2).sum())
    d1 = float(((vec1.T @ Rp) ** 2).sum())
    rank1 = rank
    pval = 2.0
    if nu > 0:
        if k1 == 1:
            rank1 = 1.0
            val = [1.0]
        else:
            val = [1.0] * k1
            rp = nu + 1
            val[k - 1] = (rp + math.sqrt(rp * (2 - rp))) / 2
            val[k1 - 1] = rp - val[k - 1]
        if res_df <= 0:
            pval = (psum_chisq(d, val) + psum_chisq(d1, val)) / 2
        else:
            k0 = max(1, round(res_df))
            dfs = [1] * len(val) + [k0]
            pval = (psum_chisq(0, [*val, -d / k0], dfs) + psum_chisq(0, [*val, -d1 / k0], dfs)) / 2
    if pval > 1:
        pval = (
            special.fdtrc(rank1, res_df, d / rank1) + special.fdtrc(rank1, res_df, d1 / rank1)
        ) / 2
    return d, min(1.0, pval), rank


def _re_tests(design, i, Ai, beta, scale, res_df, lam):
    """mgcv's ``reTest`` for a smooth without null space (bs = "ts"/"cs"): statistic
    b' Rm'Rm b / scale with Rm'Rm the Schur complement of X'X + S on the term (= [H^-1]_jj^-1),
    weights the eigenvalues of Ve_jj Rm'Rm / scale, p-value by Davies."""
    cols = design.smooths[i].cols
    if len(design.St) == 1:
        # eigenbasis: [H^-1]_jj = C diag(w) C', Ve_jj = scale C diag(w^2) C' with w = 1/(1+ls);
        # a full-rank penalty gives the unpenalised directions no weight on the term, so those
        # columns of C are zero (not rounding noise that 1 >> w^2 would amplify)
        C = (design.Rinv @ design.eigen_U)[cols]
        C[:, design.eigen_s == 0] = 0.0
        w = 1 / (1 + lam[:, :1] * design.eigen_s)
        Hjj = np.einsum("ik,bk,jk->bij", C, w, C)
        Ve = scale[:, None, None] * np.einsum("ik,bk,jk->bij", C, w * w, C)
    else:
        Rc = design.Rinv[cols]
        Hjj = np.einsum("ia,eac,jc->eij", Rc, Ai, Rc)
        Ve = scale[:, None, None] * np.einsum("ia,eac,jc->eij", Rc, Ai @ Ai, Rc)
    schur = np.linalg.inv(Hjj)
    schur = (schur + np.swapaxes(schur, 1, 2)) / 2
    bj = beta[:, cols]
    stat = np.einsum("bi,bij,bj->b", bj, schur, bj) / scale
    L = np.linalg.cholesky(schur)
    ev = np.linalg.eigvalsh(np.swapaxes(L, 1, 2) @ Ve @ L) / scale[:, None]
    ev[ev < 0] = 0
    b = beta.shape[0]
    pval = np.empty(b)
    rank = np.empty(b)
    for e in range(b):
        rank[e] = (ev[e] > ev[e].max() * EPS**0.8).sum()
        k = max(1, round(res_df[e]))
        lb = [*ev[e], -stat[e] / k]
        pval[e] = psum_chisq(0, lb, [1] * ev.shape[1] + [k])
    return stat, pval, rank

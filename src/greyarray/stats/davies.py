"""P-values of mgcv's smooth-term tests: Davies' (1980) algorithm for linear combinations of
chi-square variables, translated statement by statement from mgcv 1.8-41's ``src/davies.c``
(itself from Davies' Algol 60), with ``psum.chisq`` and ``liu2`` from its R code.

mgcv computes every penalised smooth's p-value with this numerical inversion (error bound
2e-5, but deterministic), so matching ``summary.gam`` needs the same algorithm, not the exact
distribution. Scalar code on purpose: its control flow depends on the data.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

_LN28 = math.log(2.0) / 8
_PI = math.asin(1.0) * 2


def log1pmx(x: float) -> float:
    """log(1 + x) - x, accurate for small x (R's ``log1pmx``; where R evaluates a continued
    fraction, |x| >= 0.01, log1p(x) - x is within 1e-14 relative and far faster in Python)."""
    if abs(x) >= 1e-2:
        return math.log1p(x) - x
    r = x / (2 + x)
    y = r * r
    two = 2.0
    return r * ((((two / 9 * y + two / 7) * y + two / 5) * y + two / 3) * y - x)


def _ln1(x: float, first: bool) -> float:
    return math.log1p(x) if first else log1pmx(x)


class _Davies:
    """State of one evaluation (the C code passes these around as arguments)."""

    def __init__(self, lb, nc, n, sigsq):
        self.lb, self.nc, self.n, self.r = lb, nc, n, len(lb)
        self.sigsq = sigsq

    def errbd(self, u: float) -> tuple[float, float]:
        """Bound on the tail probability; returns (bound, cutoff)."""
        cx = u * self.sigsq
        sum1 = u * cx
        u = u * 2
        for j in range(self.r - 1, -1, -1):
            nj, lj, ncj = self.n[j], self.lb[j], self.nc[j]
            x = u * lj
            y = 1.0 - x
            cx += lj * (ncj / y + nj) / y
            xy = x / y
            sum1 = sum1 + ncj * xy * xy + nj * (x * xy + _ln1(-x, False))
        return math.exp(-0.5 * sum1), cx

    def ctff(self, accx, upn, mean, lmin, lmax):
        u2, u1, c1 = upn, 0.0, mean
        rb = 2 * lmax if u2 > 0 else 2 * lmin
        while True:
            bound, c2 = self.errbd(u2 / (1 + u2 * rb))
            if bound <= accx:
                break
            u1, c1, u2 = u2, c2, u2 * 2
        while (c1 - mean) / (c2 - mean) < 0.9:
            u = (u1 + u2) * 0.5
            bound, cst = self.errbd(u / (1 + u * rb))
            if bound > accx:
                u1, c1 = u, cst
            else:
                u2, c2 = u, cst
        return c2, u2

    def truncation(self, u, tausq):
        sum1 = prod2 = prod3 = 0.0
        s = 0
        sum2 = (self.sigsq + tausq) * u * u
        prod1 = 2 * sum2
        u = 2 * u
        for j in range(self.r):
            lj, ncj, nj = self.lb[j], self.nc[j], self.n[j]
            x = u * lj
            x = x * x
            sum1 += ncj * x / (1 + x)
            if x > 1:
                prod2 += nj * math.log(x)
                prod3 += nj * _ln1(x, True)
                s = s + nj
            else:
                prod1 += nj * _ln1(x, True)
        sum1 = sum1 * 0.5
        prod2 += prod1
        prod3 += prod1
        x = math.exp(-sum1 - 0.25 * prod2) / _PI
        y = math.exp(-sum1 - 0.25 * prod3) / _PI
        err1 = 1.0 if s == 0 else 2.0 * x / s
        err2 = 2.5 * y if prod3 > 1 else 1.0
        if err2 < err1:
            err1 = err2
        x = 0.5 * sum2
        err2 = 1.0 if x <= y else y / x
        return err1 if err1 < err2 else err2

    def findu(self, utx, accx):
        ut = utx
        u = ut * 0.25
        if self.truncation(u, 0) > accx:
            while self.truncation(ut, 0) > accx:
                ut = ut * 4
        else:
            ut = u
            u = u / 4
            while self.truncation(u, 0) <= accx:
                ut = u
                u = u / 4
        for a in (2.0, 1.4, 1.2, 1.1):
            u = ut / a
            if self.truncation(u, 0) <= accx:
                ut = u
        return ut

    def integrate(self, nterm, interv, tausq, main, c):
        """Returns the increments of intl and ersm (the C loop over terms, vectorised: sums
        in another order, so equal to ~1e-15)."""
        u = (np.arange(nterm, -1, -1) + 0.5) * interv
        lb, nc, n = np.asarray(self.lb), np.asarray(self.nc), np.asarray(self.n, float)
        x = 2 * lb[None, :] * u[:, None]
        y = x * x
        yn = nc[None, :] * x / (1 + y)
        z = n * np.arctan(x) + yn
        sum1 = -2 * u * c + z.sum(axis=1)
        sum2 = np.abs(2 * u * c) + np.abs(z).sum(axis=1)
        sum3 = -0.5 * self.sigsq * u * u - (0.25 * n * np.log1p(y) + 0.5 * x * yn).sum(axis=1)
        w = interv / _PI * np.exp(sum3) / u
        if not main:
            w = w * (1 - np.exp(-0.5 * tausq * u * u))
        return float((np.sin(0.5 * sum1) * w).sum()), float((0.5 * sum2 * w).sum())

    def cfe(self, x, th):
        """(coefficient of tausq in the error, fail flag)."""
        axl = abs(x)
        sxl = -1 if x < 0 else 1
        sum1 = 0.0
        for j in range(self.r - 1, -1, -1):
            t = th[j]
            if self.lb[t] * sxl > 0.0:
                lj = abs(self.lb[t])
                axl1 = axl - lj * (self.n[t] + self.nc[t])
                axl2 = lj / _LN28
                if axl1 > axl2:
                    axl = axl1
                else:
                    if axl > axl2:
                        axl = axl2
                    sum1 = (axl - axl1) / lj
                    for k in range(j - 1, -1, -1):
                        sum1 += self.n[th[k]] + self.nc[th[k]]
                    break
        if sum1 > 100.0:
            return 1.0, True
        return 2.0 ** (sum1 * 0.25) / (_PI * axl * axl), False


def davies(lb, nc, n, sigma, c, lim, acc) -> tuple[float, int]:
    """Pr(Q < c) for Q = sum lb_j chi2_{n_j}(nc_j) + sigma N(0, 1); returns (value, ifault)
    exactly as mgcv's C ``davies`` fills ``c`` and ``ifault``."""
    r = len(lb)
    ifault = 0
    intl = ersm = 0.0
    acc1 = acc
    th = sorted(range(r), key=lambda j: -abs(lb[j]))
    sigsq = sigma * sigma
    sd = sigsq
    lmax = lmin = 0.0
    mean = 0.0
    for j in range(r):
        nj, lj, ncj = n[j], lb[j], nc[j]
        if nj < 0 or ncj < 0:
            return c, 3
        sd += lj * lj * (2.0 * nj + 4.0 * ncj)
        mean += lj * (nj + ncj)
        if lmax < lj:
            lmax = lj
        elif lmin > lj:
            lmin = lj
    if sd == 0.0:
        return (1.0 if c > 0.0 else 0.0), 0
    if lmin == 0.0 and lmax == 0.0 and sigma == 0.0:
        return c, 3
    sd = math.sqrt(sd)
    almx = -lmin if lmax < -lmin else lmax
    state = _Davies(lb, nc, n, sigsq)
    utx = 16.0 / sd
    up = 4.5 / sd
    un = -up
    utx = state.findu(utx, 0.5 * acc1)
    if c != 0.0 and almx > 0.07 * sd:
        coef, fail = state.cfe(c, th)
        tausq = 0.25 * acc1 / coef
        if not fail and state.truncation(utx, tausq) < 0.2 * acc1:
            state.sigsq = state.sigsq + tausq
            utx = state.findu(utx, 0.25 * acc1)
    acc1 = 0.5 * acc1
    while True:
        cut, up = state.ctff(acc1, up, mean, lmin, lmax)
        d1 = cut - c
        if d1 < 0.0:
            return 1.0, ifault
        cut, un = state.ctff(acc1, un, mean, lmin, lmax)
        d2 = c - cut
        if d2 < 0.0:
            return 0.0, ifault
        intv = 2 * _PI / d1 if d1 > d2 else 2 * _PI / d2
        x = utx / intv
        nt = math.floor(x)
        if x - nt > 0.5:
            nt += 1
        x = 3.0 / math.sqrt(acc1)
        ntm = math.floor(x)
        if x - ntm > 0.5:
            ntm += 1
        if nt > ntm * 1.5:
            intv1 = utx / ntm
            x = 2 * _PI / intv1
            if x <= abs(c):
                break
            cm, _ = state.cfe(c - x, th)
            cp, fail_p = state.cfe(c + x, th)
            tausq = 0.33 * acc1 / (1.1 * (cm + cp))
            if fail_p:  # the C code keeps only the second call's flag
                break
            acc1 = acc1 * 0.67
            if ntm > lim:
                return -1.0, ifault
            di, de = state.integrate(ntm, intv1, tausq, False, c)
            intl += di
            ersm += de
            lim = lim - ntm
            state.sigsq = state.sigsq + tausq
            utx = state.findu(utx, 0.25 * acc1)
            acc1 = 0.75 * acc1
        else:
            break
    if nt > lim:
        return -1.0, 1
    di, de = state.integrate(nt, intv, 0.0, True, c)
    intl += di
    ersm += de
    value = 0.5 - intl
    x = ersm + acc / 10.0
    j = 1
    for _ in range(4):
        if j * x == j * ersm:
            ifault = 2
        j = j * 2
    return value, ifault


def liu2(x: float, lam, h) -> float:
    """Liu, Tang and Zhang's approximation (mgcv's fallback when Davies fails), upper tail."""
    lam, h = np.asarray(lam, float), np.asarray(h, float)
    lh = lam * h
    mu_q = lh.sum()
    lh = lh * lam
    c2 = lh.sum()
    lh = lh * lam
    c3 = lh.sum()
    if x <= 0 or c2 <= 0:
        return 1.0
    s1 = c3 / c2**1.5
    s2 = (lh * lam).sum() / c2**2
    t = (x - mu_q) / math.sqrt(2 * c2)
    if s1**2 > s2:
        a = 1 / (s1 - math.sqrt(s1**2 - s2))
        delta = s1 * a**3 - a**2
        ell = a**2 - 2 * delta
    else:
        a = 1 / s1
        delta = 0.0
        if c3 == 0:
            return 1.0
        ell = c2**3 / c3**2
    q = t * math.sqrt(2) * a + ell + delta
    if delta == 0:
        return float(stats.chi2.sf(q, ell))
    return float(stats.ncx2.sf(q, ell, delta))


def psum_chisq(q: float, lb, df=None, tol: float = 2e-5, nlim: int = 100_000) -> float:
    """Upper tail P(sum lb_j chi2_{df_j} > q), as mgcv's ``psum.chisq`` (Davies, then Liu)."""
    df = [1] * len(lb) if df is None else [round(d) for d in df]
    nc = [0.0] * len(lb)
    value, ifault = davies(list(map(float, lb)), nc, df, 0.0, float(q), nlim, tol)
    if ifault == 0 or ifault == 2:
        return 1 - value
    return liu2(q, lb, df)

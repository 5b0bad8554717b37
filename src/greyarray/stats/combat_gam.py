"""ComBat-GAM's smooth terms, as neuroHarmonize 2.5.2 fits them through statsmodels' GLMGam.

neuroHarmonize's ``harmonizationLearn(..., smooth_terms=[...])`` replaces ComBat's linear fit of
the covariates by a penalised regression spline per element (Pomponio et al. 2020), with
statsmodels' choices, reproduced here step for step (read from statsmodels' source):

- the basis: ``BSplines(x, df=10, degree=3)``: cubic B-splines on all knots = the minimum and
  maximum of x (each 4 times) and 6 inner knots at R's type-7 quantiles 1/7 ... 6/7 of x; the
  first basis function is dropped (``include_intercept=False``), leaving 9 columns;
- the penalty: the integral of products of second derivatives, by Simpson's rule on the knots
  with 3 points between each pair (``get_covder2``); the fit minimises
  |y - X b|^2 + b' (2 alpha S) b (``penalized_wls`` doubles the penalty);
- the penalty weight: ``select_penweight_kfold``, per element: for each alpha of
  ``logspace(0, 7, 11)`` (the product grid with several smooths) the subjects are shuffled by
  one ``Generator.shuffle`` of the run's generator (``default_rng(seed)``, shared by all
  elements in order: every alpha of every element draws a new split), cut by ``array_split``
  into 5 folds, each fold predicted from a fit to the others; the cost of a fold is
  |y - y_hat| / n_fold, an alpha's error the mean over folds, and the first smallest wins.

With the same seed, the same subjects and elements in the same order, the folds, the chosen
alphas and the coefficients are neuroHarmonize's (``harmonizationLearn(..., seed=S)``): what
limits the agreement is only rounding (and, in principle, two alphas whose errors tie within
it). Without a seed neuroHarmonize draws other folds on every run.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from greyarray.errors import DataError
from greyarray.stats.compiled import compiled

DF, DEGREE, INTEGRATION_POINTS = 10, 3, 3
GRID = np.logspace(0, 7, 11)  # statsmodels' default penalty weights
FOLDS = 5


@dataclass(frozen=True)
class Spline:
    """One smooth term: its variable and knots (all of them, sorted, as statsmodels keeps)."""

    variable: str
    knots: np.ndarray

    @classmethod
    def fit(cls, variable: str, x: np.ndarray) -> Spline:
        """statsmodels' ``get_knots_bsplines(x, df=10, degree=3)`` (quantile spacing)."""
        order = DEGREE + 1
        quantiles = np.linspace(0, 1, DF - order + 2)[1:-1]
        inner = np.array([np.percentile(x, 100 * q) for q in quantiles])
        knots = np.concatenate(([x.min(), x.max()] * order, inner))
        return cls(variable, np.sort(knots))

    @property
    def size(self) -> int:
        """Basis columns: one per B-spline, the first dropped."""
        return len(self.knots) - (DEGREE + 1) - 1

    @property
    def names(self) -> list[str]:
        """statsmodels' column names (``age_s0`` ...)."""
        return [f"{self.variable}_s{i}" for i in range(self.size)]

    def basis(self, x: np.ndarray, deriv: int = 0, where: str = "") -> np.ndarray:
        """(len(x), size): statsmodels' ``_eval_bspline_basis``, first column dropped. Values
        outside the knots are refused, as statsmodels refuses them."""
        from scipy.interpolate import splev

        x = np.asarray(x, dtype=np.float64)
        low, high = self.knots[0], self.knots[-1]
        if x.size and (x.min() < low or x.max() > high):
            bad = x[(x < low) | (x > high)][0]
            raise DataError(
                f"{where}{self.variable} = {bad:g} is outside the range the smooth "
                f"s({self.variable}) was fitted on ({low:g} to {high:g}); neuroHarmonize's "
                "spline basis is not defined there"
            )
        out = np.empty((x.size, self.size))
        for i in range(self.size):
            coefficients = np.zeros(self.size + 1)
            coefficients[i + 1] = 1
            out[:, i] = splev(x, (self.knots, coefficients, DEGREE), der=deriv)
        return out

    def penalty(self) -> np.ndarray:
        """statsmodels' ``get_covder2``: Simpson's rule over the knots and 3 points between."""
        from scipy.integrate import simpson

        unique = np.unique(self.knots)
        steps = np.arange(INTEGRATION_POINTS + 1) / (INTEGRATION_POINTS + 1)
        points = np.concatenate(
            ((unique[:-1, None] + np.diff(unique)[:, None] * steps).ravel(), [unique[-1]])
        )
        d2 = self.basis(points, deriv=2)
        return simpson(d2[:, :, None] * d2[:, None, :], x=points, axis=0)


def penalty_grid(splines: list[Spline], start: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(alphas (n_grid, n_smooths), penalties (n_grid, p, p)): the product grid of every
    smooth's weights, each point's penalty 2 x sum(alpha_j S_j) placed on the smooth's
    columns (the linear columns, before ``start``, are not penalised)."""
    alphas = np.array(list(itertools.product(*[GRID] * len(splines))))
    blocks = [spline.penalty() for spline in splines]
    penalties = np.zeros((len(alphas), p, p))
    for g, point in enumerate(alphas):
        at = start
        for alpha, block in zip(point, blocks, strict=True):
            k = block.shape[0]
            penalties[g, at : at + k, at : at + k] = 2 * alpha * block
            at += k
    return alphas, penalties


def folds(rng: np.random.Generator, n: int, n_grid: int) -> np.ndarray:
    """(n_grid, n) fold of each subject for each grid point: statsmodels' ``KFold(5,
    shuffle=True)`` split anew for every alpha (``np.array_split`` of one shuffle)."""
    sizes = [n // FOLDS + (f < n % FOLDS) for f in range(FOLDS)]
    by_position = np.repeat(np.arange(FOLDS, dtype=np.int8), sizes)
    out = np.empty((n_grid, n), np.int8)
    for g in range(n_grid):
        order = np.arange(n)
        rng.shuffle(order)
        out[g, order] = by_position
    return out


@compiled
def cross_validate(x, y, fold, penalties):  # pragma: no cover - compiled
    """(index of the chosen grid point, coefficients, ok): the penalised fit of ``y`` on ``x``
    with the penalty whose 5-fold prediction error is smallest (first of ties)."""
    n, p = x.shape
    n_grid = penalties.shape[0]
    xtx = x.T @ x
    xty = x.T @ y
    nonzero = np.zeros((n, p), np.int64)  # B-spline rows have 4 non-zeros of 9: skip zeros
    width = np.zeros(n, np.int64)
    for i in range(n):
        for j in range(p):
            if x[i, j] != 0.0:
                nonzero[i, width[i]] = j
                width[i] += 1
    best, chosen = np.inf, 0
    gram = np.zeros((FOLDS, p, p))
    cross = np.zeros((FOLDS, p))
    coef = np.zeros((FOLDS, p))
    for g in range(n_grid):
        gram[:] = 0.0
        cross[:] = 0.0
        counts = np.zeros(FOLDS)
        for i in range(n):
            f = fold[g, i]
            counts[f] += 1
            for a in range(width[i]):
                j = nonzero[i, a]
                cross[f, j] += x[i, j] * y[i]
                for b in range(a, width[i]):
                    k = nonzero[i, b]
                    gram[f, j, k] += x[i, j] * x[i, k]
        for f in range(FOLDS):
            for j in range(p):
                for k in range(j):
                    gram[f, j, k] = gram[f, k, j]
            coef[f] = np.linalg.solve(xtx - gram[f] + penalties[g], xty - cross[f])
        squares = np.zeros(FOLDS)
        for i in range(n):
            f = fold[g, i]
            fitted = 0.0
            for a in range(width[i]):
                fitted += x[i, nonzero[i, a]] * coef[f, nonzero[i, a]]
            squares[f] += (y[i] - fitted) ** 2
        error = 0.0
        for f in range(FOLDS):
            error += np.sqrt(squares[f]) / counts[f]
        error /= FOLDS
        if error < best:
            best, chosen = error, g
    return chosen, np.linalg.solve(xtx + penalties[chosen], xty)

"""Which subjects look unlike the cohort: robust z-scores of per-subject summaries.

The rule of the report: a subject is flagged when its map correlates with the cohort's median
map more than ``THRESHOLD`` (3) robust SD below the cohort's typical correlation (registration
failure, a spatially shifted, scrambled or wrong-subject map). Robust SD is 1.4826 x MAD: the SD
for normal data, but not inflated by the outliers themselves. Correlations are compared after
Fisher's z transform (atanh): near 1 their spread is squeezed and skewed, so a plain MAD would
flag the ordinary tail of a heterogeneous cohort (e.g. the oldest subjects). High correlations
are never flagged.

Correlation is blind to a map's offset and scale (wrong units, a constant added), so a subject
is also flagged when its mean or SD over elements is more than ``GROSS`` (5) robust SD from the
cohort's: gross failures only, since at 3 robust SD a clean cohort of 1,000 would flag ~5
subjects per statistic by chance. Flagged subjects are reported, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from greyarray.report.stream import CohortStats

THRESHOLD = 3.0  # correlation with the median map (Fisher z), robust SD below the median
GROSS = 5.0  # mean and SD over elements, robust SD from the median (either side)
MAD_TO_SD = 1.4826
MEAN_AD_TO_SD = 1.2533  # sqrt(pi / 2): mean absolute deviation to SD for normal data


def robust_centre_scale(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 MAD) of the finite values; when over half are equal (MAD 0) the scale
    is the mean absolute deviation (x 1.2533); (0, 0) without values."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 0.0
    centre = float(np.median(finite))
    scale = MAD_TO_SD * float(np.median(np.abs(finite - centre)))
    if scale == 0:
        scale = MEAN_AD_TO_SD * float(np.mean(np.abs(finite - centre)))
    return centre, scale


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / robust SD; all zeros when every value is the same."""
    values = np.asarray(values, dtype=float)
    centre, scale = robust_centre_scale(values)
    return (values - centre) / scale if scale > 0 else np.zeros_like(values)


def correlation_limit(r: np.ndarray, threshold: float = THRESHOLD) -> float | None:
    """The correlation below which a subject is flagged (None if the cohort has no spread)."""
    centre, scale = robust_centre_scale(fisher(r))
    return float(np.tanh(centre - threshold * scale)) if scale > 0 else None


def fisher(r: np.ndarray) -> np.ndarray:
    """atanh(r), with |r| kept below 1 so that identical maps stay finite."""
    return np.arctanh(np.clip(r, -1 + 1e-12, 1 - 1e-12))


@dataclass(frozen=True)
class SubjectChecks:
    """Robust z-scores per subject and why each flagged subject is flagged."""

    z_correlation: np.ndarray
    z_mean: np.ndarray
    z_sd: np.ndarray
    reasons: list[list[str]]  # empty for subjects not flagged

    @property
    def flagged(self) -> np.ndarray:
        return np.array([bool(r) for r in self.reasons], dtype=bool)


def check_subjects(
    stats: CohortStats, threshold: float = THRESHOLD, gross: float = GROSS
) -> SubjectChecks:
    z_corr = robust_z(fisher(stats.correlation))
    z_mean, z_sd = robust_z(stats.subject_mean), robust_z(stats.subject_sd)
    reasons = []
    for i in range(len(z_corr)):
        why = []
        if z_corr[i] < -threshold or not np.isfinite(stats.correlation[i]):
            why.append(
                f"correlation with the median map {stats.correlation[i]:.3f} "
                f"(robust z {z_corr[i]:.1f})"
            )
        for name, z, value in (
            ("mean", z_mean, stats.subject_mean),
            ("SD", z_sd, stats.subject_sd),
        ):
            if abs(z[i]) > gross:
                why.append(f"{name} {value[i]:.4g} (robust z {z[i]:+.1f})")
        reasons.append(why)
    return SubjectChecks(z_corr, z_mean, z_sd, reasons)

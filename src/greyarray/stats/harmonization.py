"""``harmonize``'s work on files: the inputs, the estimates kept in the HDF5, ``--apply-from``.

Fit: read ``scalars/<scalar>`` stripe by stripe to estimate (combat.estimate), then read it again
to write the harmonised scalar through ``io.store.scalar_output`` (the one place a scalar is added
to a file), with everything estimated under ``greyarray/harmonization/<output>/`` (below). Apply:
the same second pass with the estimates of an earlier fit, for new subjects from known batches.

``greyarray/harmonization/<output>/`` (R and ModelArray never look there):

- attributes ``about`` (JSON: method, options, batch column, levels, covariates, design columns,
  counts), ``greyarray_version``, ``created_utc``, ``applied_from`` (apply only);
- ``batch`` (per subject row: index into ``batch_levels``, -1 not harmonised), ``batch_levels``;
- per element: ``coefficients`` (design columns x elements), ``grand_mean``, ``var_pooled``,
  ``status`` (0 harmonised, 1 left as it was: no variance, 2 not harmonised: NaN), and per batch
  ``gamma_hat``, ``delta_hat``, ``gamma_star``, ``delta_star``, ``n_with_value``;
- per batch the priors ``gamma_bar``, ``t2``, ``a_prior``, ``b_prior``;
- ``covariates_table``: the fit's cohort columns the model uses (CSV text, rows in HDF5 order),
  from which apply-from codes new subjects exactly as the fit coded its own;
- ComBat-GAM: ``smooth_knots`` (smooths x knots; attribute ``variables``) and ``alpha``;
- for the report: ``batch_mean_before``/``_after`` (batches x elements) and
  ``subject_mean_before``/``_after``.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from greyarray.errors import DataError, OutputError, UsageError
from greyarray.io.cohort import read_csv_table
from greyarray.io.fileio import check_free_space, check_output, check_writable
from greyarray.io.h5read import decode, read_scalar, strings
from greyarray.io.inputs import open_hdf5
from greyarray.io.names import check_name
from greyarray.io.store import options_like, read_stripe, scalar_output
from greyarray.io.threads import thread_pool
from greyarray.stats import combat
from greyarray.stats.combat_gam import Spline
from greyarray.stats.design import build_design, match_cohort

log = logging.getLogger(__name__)

GROUP = "greyarray/harmonization"


@dataclass(frozen=True)
class Request:
    """One ``harmonize`` run (a fit, or with ``apply_from`` an application)."""

    input_hdf5: Path
    cohort_file: Path
    scalar: str
    output_scalar: str
    batch: str | None = None
    covariates: str | None = None
    options: combat.Options = field(default_factory=combat.Options)
    output_hdf5: Path | None = None
    apply_from: str | None = None  # FILE.h5:SCALAR
    overwrite: bool = False
    discard_results: bool = False  # remove the results fitted to a scalar it replaces
    nprocs: int = 1
    command_line: str | None = None

    @property
    def output(self) -> Path:
        return self.output_hdf5 or self.input_hdf5

    @property
    def in_place(self) -> bool:
        return os.path.realpath(self.output) == os.path.realpath(self.input_hdf5)


@dataclass
class Done:
    """What a run did: the record kept with the estimates, and what was not harmonised."""

    about: dict
    gaps: list[str]
    output: Path
    discarded: list[str] = field(default_factory=list)  # results removed (--discard-results)


def harmonize(request: Request) -> Done:
    """Fit (or apply) and write; BLAS on one thread (its threads only contend with the
    compression threads and each other on these small products)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _harmonize(request)


def _harmonize(request: Request) -> Done:
    check_name("output scalar", request.output_scalar)
    if request.in_place and request.output_scalar == request.scalar:
        raise UsageError(
            f"--output-scalar {request.output_scalar!r} is the input scalar, which is never "
            "replaced; choose another name"
        )
    cohort = read_csv_table(request.cohort_file, "cohort file")
    fitted = load(request.apply_from) if request.apply_from else None
    with open_hdf5(request.input_hdf5) as h5:
        stored = read_scalar(h5, request.scalar)
        names, n_elements = stored.names, stored.n_elements
        table = match_cohort(cohort, names, request.scalar, request.cohort_file)
        storage = options_like(stored.values, request.nprocs)
        discard = _check_output(request, h5, n_elements)
        if fitted is None:
            model = combat.build_model(
                table,
                _batch_column(request),
                request.covariates,
                request.options,
                request.scalar,
                str(request.cohort_file),
            )
            _check_space(request, len(names), n_elements, storage, model)
            log.info(
                "Estimating ComBat%s for %s: %d subjects in %d batches of %s, %d elements",
                "-GAM" if model.splines else "",
                request.scalar,
                int(model.used.sum()),
                model.n_batch,
                model.batch_column,
                n_elements,
            )
            with thread_pool(request.nprocs) as pool:
                estimates = combat.estimate(
                    model,
                    stored.values,
                    request.options,
                    nprocs=request.nprocs,
                    read=partial(read_stripe, pool=pool),
                )
            adjust = combat.adjuster(estimates)
            method = "ComBat-GAM" if model.splines else "ComBat"
            about = combat.about(estimates, method, request.scalar)
            gaps = combat.log_gaps(estimates)
        else:
            fitted.check_elements(h5, n_elements)
            model = fitted.model_for(table, request.batch, str(request.cohort_file))
            _check_space(request, len(names), n_elements, storage, model)
            adjust = fitted.adjuster(model)
            about = {**fitted.about, "input_scalar": request.scalar}
            about["applied_from"] = request.apply_from
            about["subjects_per_batch"] = _counts(model)
            gaps = []
    with (
        scalar_output(
            request.output,
            request.output_scalar,
            names,
            n_elements,
            storage,
            extra=estimate_bytes(model, n_elements),
            overwrite=request.overwrite,
            template=None if request.output.exists() else request.input_hdf5,
            command_line=request.command_line,
        ) as out,
        contextlib.ExitStack() as stack,
    ):
        source = out.h5 if request.in_place else stack.enter_context(open_hdf5(request.input_hdf5))
        values = read_scalar(source, request.scalar).values
        width = combat.stripe_width(values, len(names), out.chunk_width)
        read = partial(read_stripe, pool=out.pool)
        for start, block in combat.stripes(values, width, "Harmonizing", read, dtype=None):
            out.write(start, adjust.adjust(start, block, out.values.dtype))
        group = out.group(f"{GROUP}/{request.output_scalar}")
        if fitted is None:
            save(group, estimates, used_columns(table, model), about)
        else:
            fitted.save(group, model, about)
        save_summary(group, adjust)
        for analysis in discard:  # stale: fitted to the scalar just replaced
            del out.h5[f"results/{analysis}"]
    if discard:
        log.warning(
            "%s: results %s, fitted to the scalar replaced, were removed (--discard-results)",
            request.output,
            ", ".join(discard),
        )
    return Done(about, gaps, request.output, discard)


def _batch_column(request: Request) -> str:
    if not request.batch:
        raise UsageError("--batch COLUMN is required (the cohort column naming each site)")
    return request.batch


def _check_output(request: Request, h5: h5py.File, n_elements: int) -> list[str]:
    """Before any work: the output can be written, holds the input's elements (another file),
    and an existing scalar of that name may be replaced (``_check_replace``). Returns the
    analyses to remove with it."""
    if request.in_place:
        check_writable(request.input_hdf5)
        return _check_replace(request, h5, request.input_hdf5)
    output = request.output
    if not output.exists():
        check_output(output, request.overwrite)
        return []
    check_writable(output)
    with open_hdf5(output) as other:
        counts = sorted(_element_counts(other) - {n_elements})
        if counts:
            raise DataError(
                f"{output}: holds {' and '.join(f'{c:,}' for c in counts)} elements, "
                f"scalars/{request.scalar} of {request.input_hdf5} has {n_elements:,}; write the "
                "harmonised scalar into a file of the same elements (or a new --output-hdf5)"
            )
        same_elements(h5, other, request.input_hdf5, output, "the harmonised scalar would "
                      "put its values on other elements")  # fmt: skip
        return _check_replace(request, other, output)


def _check_replace(request: Request, h5: h5py.File, path: Path) -> list[str]:
    """An existing ``scalars/<output>`` is replaced only with --overwrite and never when it
    was converted from files (its provenance would then describe other values); the results
    GreyArray fitted to it are never silently left stale: refused unless --discard-results,
    which removes them with it (returned)."""
    from greyarray.stats.results import fitted_to

    name = request.output_scalar
    where = f"scalars/{name}"
    if where not in h5:
        return []
    if f"greyarray/sources/{name}" in h5:
        raise UsageError(
            f"{path}: {where} was converted from files (greyarray/sources/{name}); harmonize "
            "never replaces a converted scalar: choose another --output-scalar"
        )
    if not request.overwrite:
        raise OutputError(f"{path}: {where} exists; use --overwrite to replace it")
    fitted, unknown = fitted_to(h5, name)
    if fitted and not request.discard_results:
        raise OutputError(
            f"{path}: results {', '.join(fitted)} were fitted to {where}; replacing it would "
            "leave them describing values no longer there. Use --discard-results to remove "
            "them with it, or another --output-scalar"
        )
    if unknown:
        log.warning(
            "%s: results %s record no scalar (written by ModelArray?); if they were fitted to "
            "%s, fit them again after it is replaced",
            path,
            ", ".join(unknown),
            where,
        )
    return fitted


def estimate_bytes(model: combat.Model, n_elements: int) -> int:
    """An upper bound of what ``save`` and ``save_summary`` keep beside the values: per element
    the float64 coefficients, grand mean, pooled variance, smoothing penalties and per batch
    gamma/delta hat and star, the int32 counts and float32 mean maps before and after."""
    b, p, s = model.n_batch, len(model.columns), len(model.splines)
    return n_elements * (8 * (p + 2 + 4 * b + s) + 1 + 4 * b + 8 * b) + 2**20


def _check_space(request: Request, n_subjects: int, n_elements: int, storage, model) -> None:
    """Before the passes over the data: room for the harmonised values, the estimates and, for
    an existing file, the updated copy of it that replaces it."""
    output = request.output
    values = n_subjects * n_elements * np.dtype(storage.dtype).itemsize
    size = output.stat().st_size if output.exists() else 0
    need = size + values + estimate_bytes(model, n_elements)
    check_free_space(output, need, f"scalars/{request.output_scalar} and its estimates")


def _element_counts(h5: h5py.File) -> set[int]:
    """The element counts of a ModelArray file: of its scalars and results."""
    found = set()
    for group, name in (("scalars", "values"), ("results", "results_matrix")):
        for item in h5.get(group, {}).values() if isinstance(h5.get(group), h5py.Group) else []:
            data = item.get(name) if isinstance(item, h5py.Group) else None
            if isinstance(data, h5py.Dataset) and data.ndim == 2:
                found.add(int(data.shape[1]))
    return found


def same_elements(first: h5py.File, second: h5py.File, first_path, second_path, why: str):
    """Refuse (one line) two files whose stored element spaces differ (``why``: what would go
    wrong); a warning when either stores none, so that they cannot be compared."""
    from greyarray.io.spaces import element_difference

    difference, complete = element_difference(first, second)
    if difference:
        raise DataError(
            f"{second_path}: its elements differ from those of {first_path} ({difference}); {why}"
        )
    if not complete:
        log.warning(
            "%s and %s: not both store their element space (greyarray/geometry, written by "
            "greyarray to-modelarray), so GreyArray cannot check that they hold the same "
            "elements; only their element counts agree",
            first_path,
            second_path,
        )


def _counts(model: combat.Model) -> dict[str, int]:
    counts = np.bincount(model.batch[model.used], minlength=model.n_batch)
    return {level: int(c) for level, c in zip(model.levels, counts, strict=True)}


def used_columns(table: pd.DataFrame, model: combat.Model) -> pd.DataFrame:
    """The cohort columns the model reads: the batch column and those named in the covariates."""
    rhs = model.covariates
    named = [
        c
        for c in table.columns
        if c != model.batch_column
        and (re.search(rf"(?<![\w.]){re.escape(c)}(?![\w.])", rhs) or f"`{c}`" in rhs)
    ]
    return table[[model.batch_column, *named]]


# ---- the estimates in the HDF5 ------------------------------------------------------------------
def _dataset(group: h5py.Group, name: str, data, dtype=None) -> None:
    """Uncompressed: estimates are float64 noise that gzip barely shrinks (~20 MB for 91k
    elements), and deflating them took a second of every run."""
    group.create_dataset(name, data=np.asarray(data, dtype=dtype))


def _text(group: h5py.Group, name: str, values) -> None:
    group.create_dataset(name, data=[str(v) for v in values], dtype=h5py.string_dtype())


def _covariates_table(group: h5py.Group, table: pd.DataFrame) -> None:
    data = table.to_csv(index=False).encode()
    group.create_dataset("covariates_table", data=np.array([data], f"S{len(data) or 1}"))


def save(group: h5py.Group, estimates: combat.Estimates, table: pd.DataFrame, about: dict):
    """Everything a fit estimated (module docstring), under ``group``."""
    from greyarray import __version__

    model = estimates.model
    group.attrs["about"] = combat.dumps(about)
    group.attrs["greyarray_version"] = __version__
    group.attrs["created_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
    )
    _text(group, "batch_levels", model.levels)
    _dataset(group, "batch", model.batch, np.int32)
    _text(group, "design_columns", model.columns)
    for name in ("coefficients", "grand_mean", "var_pooled", "status"):
        source = {"coefficients": "coef"}.get(name, name)
        _dataset(group, name, getattr(estimates, source))
    for name in ("gamma_hat", "delta_hat", "gamma_star", "delta_star"):
        _dataset(group, name, getattr(estimates, name), np.float64)
    _dataset(group, "n_with_value", estimates.count)
    for name, key in (("gamma_bar", "gamma_bar"), ("t2", "t2"), ("a_prior", "a"), ("b_prior", "b")):
        _dataset(group, name, estimates.priors[key], np.float64)
    _covariates_table(group, table)
    if model.splines:
        knots = group.create_dataset("smooth_knots", data=[s.knots for s in model.splines])
        knots.attrs["variables"] = [s.variable for s in model.splines]
        _dataset(group, "alpha", estimates.alpha)


def save_summary(group: h5py.Group, adjust: combat.Adjuster) -> None:
    """Per batch mean maps and per subject means before and after (the report draws them)."""
    batch_means, subject_means = adjust.summary.means()
    for k, when in enumerate(("before", "after")):
        _dataset(group, f"batch_mean_{when}", batch_means[k], np.float32)
        _dataset(group, f"subject_mean_{when}", subject_means[k], np.float32)


@dataclass
class Fitted:
    """The estimates of an earlier fit, read back for ``--apply-from``."""

    where: str
    about: dict
    arrays: dict[str, np.ndarray]
    table: pd.DataFrame
    knots: list[np.ndarray]
    path: Path  # the fit's HDF5

    def check_elements(self, h5: h5py.File, n_elements: int) -> None:
        if n_elements != self.arrays["grand_mean"].size:
            raise DataError(
                f"{h5.filename}: {n_elements} elements, but {self.where} was fitted on "
                f"{self.arrays['grand_mean'].size}"
            )
        with open_hdf5(self.path) as fit:
            same_elements(fit, h5, self.path, h5.filename, "the estimates apply to the same "
                          "elements only")  # fmt: skip

    def model_for(self, table: pd.DataFrame, batch: str | None, where: str) -> combat.Model:
        """The new subjects coded as the fit coded its own: the fit's batch levels, factor
        levels and contrasts, the spline knots (values outside them refused)."""
        about = self.about
        column = about["batch_column"]
        if batch and batch != column:
            raise UsageError(
                f"--batch {batch!r}: {self.where} was fitted with batch column {column!r}"
            )
        if column not in table.columns:
            raise DataError(f"{where}: no batch column {column!r} (the fit's)")
        levels, smooth = about["levels"], about["smooth"]
        labels = table[column]
        known = labels.notna().to_numpy()
        unknown = sorted({combat.batch_label(v) for v in labels[known]} - set(levels))
        if unknown:
            raise DataError(
                f"{where}: {column} {', '.join(map(repr, unknown))} was not in the fit of "
                f"{self.where} (batches: {', '.join(levels)}); ComBat cannot harmonise a batch it "
                "has not estimated"
            )
        linear, names, has = self._linear(table, where)
        values = np.zeros((len(table), len(smooth)))
        for j, variable in enumerate(smooth):
            if variable not in table.columns:
                raise DataError(f"{where}: s({variable}): no column {variable!r}")
            values[:, j] = pd.to_numeric(table[variable], errors="coerce").to_numpy(float)
            has &= np.isfinite(values[:, j])
        has &= known
        code = np.full(len(table), -1)
        code[has] = [levels.index(combat.batch_label(v)) for v in labels[has]]
        if (left := int((~has).sum())) > 0:
            log.warning(
                "%d of %d subjects have no %s or a missing covariate: not harmonised (NaN rows)",
                left,
                len(table),
                column,
            )
        reference = about["reference"]
        model = combat.Model(
            column,
            about["covariates"],
            levels,
            code,
            None if reference is None else levels.index(reference),
            linear,
            names,
            [Spline(v, k) for v, k in zip(smooth, self.knots, strict=True)],
            values if smooth else None,
        )
        for j, spline in enumerate(model.splines):
            spline.basis(values[has, j], where=f"{where}: ")  # refuses values outside the knots
        return model

    def _linear(self, table: pd.DataFrame, where: str):
        """The covariate columns of the new subjects: the model matrix of the fit's table and
        the new rows together, which keeps the fit's levels; refused when that changes the fit's
        own rows (a transform that depends on the data: poly(), scale(), center())."""
        about = self.about
        parametric, _ = combat.parse_covariates(about["covariates"], "y")
        columns = [c for c in self.table.columns if c != about["batch_column"]]
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise DataError(f"{where}: no column {', '.join(map(repr, missing))} (the fit's)")
        if parametric == "1":
            return np.zeros((len(table), 0)), [], np.ones(len(table), bool)
        formula = f"y ~ {parametric}"
        both = pd.concat([self.table[columns], table[columns]], ignore_index=True)
        quiet = logging.getLogger("greyarray.stats.design")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the fit said it already; the new table's say below
        try:
            own = build_design(formula, self.table[columns])
            joint = build_design(formula, both)
        finally:
            quiet.setLevel(level)
        if joint.columns != own.columns:
            new = [c for c in joint.columns if c not in own.columns]
            raise DataError(
                f"{where}: covariate levels the fit of {self.where} did not have "
                f"({', '.join(new)}); ComBat cannot keep an effect it has not estimated"
            )
        n_own = len(self.table)
        own_rows = joint.rows < n_own
        if not np.allclose(joint.matrix[own_rows], own.matrix, rtol=1e-12, atol=0):
            raise DataError(
                f"{self.where}: its covariates {about['covariates']!r} use a transform that "
                "depends on the data (poly(), scale(), center()...): new subjects cannot be "
                "coded as the fit's were; fit again with plain columns"
            )
        keep = [j for j, name in enumerate(joint.columns) if name != "Intercept"]
        linear = np.zeros((len(table), len(keep)))
        new_rows = joint.rows[~own_rows] - n_own
        linear[new_rows] = joint.matrix[~own_rows][:, keep]
        has = np.zeros(len(table), bool)
        has[new_rows] = True
        return linear, [joint.columns[j] for j in keep], has

    def adjuster(self, model: combat.Model) -> combat.Adjuster:
        a = self.arrays
        return combat.Adjuster(
            model,
            a["coefficients"],
            a["grand_mean"],
            a["var_pooled"],
            a["gamma_star"],
            a["delta_star"],
            a["status"],
        )

    def save(self, group: h5py.Group, model: combat.Model, about: dict) -> None:
        """The fit's estimates again, with the new subjects' batches (self-contained: an
        applied scalar can itself be applied from, and the report reads it like a fit)."""
        from greyarray import __version__

        group.attrs["about"] = combat.dumps(about)
        group.attrs["applied_from"] = self.where
        group.attrs["greyarray_version"] = __version__
        for name, data in self.arrays.items():
            _dataset(group, name, data)
        _dataset(group, "batch", model.batch, np.int32)
        _text(group, "batch_levels", about["levels"])
        _text(group, "design_columns", about["columns"])
        _covariates_table(group, self.table)
        if self.knots:
            knots = group.create_dataset("smooth_knots", data=self.knots)
            knots.attrs["variables"] = about["smooth"]


ARRAYS = (
    "coefficients",
    "grand_mean",
    "var_pooled",
    "status",
    "gamma_hat",
    "delta_hat",
    "gamma_star",
    "delta_star",
    "n_with_value",
    "gamma_bar",
    "t2",
    "a_prior",
    "b_prior",
)


def load(text: str) -> Fitted:
    """The estimates of ``FILE.h5:SCALAR`` (a one-line error for anything else)."""
    path, scalar = combat.model_path(text)
    where = f"{path}:{scalar}"
    with open_hdf5(path) as h5:
        group = h5.get(f"{GROUP}/{scalar}")
        if not isinstance(group, h5py.Group):
            present = sorted(h5.get(GROUP, {})) if isinstance(h5.get(GROUP), h5py.Group) else []
            raise DataError(
                f"{path}: no harmonization estimates of {scalar!r} (harmonised scalars: "
                f"{', '.join(present) or 'none'})"
            )
        try:
            about = json.loads(group.attrs["about"])
            arrays = {name: group[name][()] for name in ARRAYS}
            arrays["alpha"] = group["alpha"][()] if "alpha" in group else None
            raw = bytes(group["covariates_table"][0]).decode()
            table = pd.read_csv(io.StringIO(raw))
            knots = list(group["smooth_knots"][()]) if "smooth_knots" in group else []
            strings(group["batch_levels"], f"{where}/batch_levels", 10**6)
        except (KeyError, ValueError, TypeError, OSError) as err:
            raise DataError(f"{where}: damaged harmonization estimates ({err})") from None
        arrays = {k: v for k, v in arrays.items() if v is not None}
        return Fitted(where, about, arrays, table, knots, path)


def read_summary(group: h5py.Group) -> dict:
    """What the report needs of one harmonised scalar (decoded, checked lightly)."""
    about = json.loads(group.attrs["about"])
    levels = decode(group["batch_levels"][()], f"{group.name}/batch_levels")
    return {
        "about": about,
        "levels": levels,
        "batch": group["batch"][()] if "batch" in group else None,
        **{
            f"{what}_{when}": group[f"{what}_{when}"][()]
            for what in ("batch_mean", "subject_mean")
            for when in ("before", "after")
        },
        "status": group["status"][()],
        "n_with_value": group["n_with_value"][()],
    }

"""``group --harmonize COLUMN``: every scalar harmonised by a participants.tsv or sessions.tsv
column (ComBat, parametric empirical Bayes), before any ``--model``, which is then fitted to the
harmonised scalar. Each group HDF5 keeps both scalars: ``<scalar>`` and ``<scalar>_combat``.

The covariates kept are ``--harmonize-covariates``, by default the ``--model``'s terms (a
smooth s(x, ...) becomes ComBat-GAM's s(x)), so that the effects the model tests are not
removed with the sites. A re-run keeps a harmonised scalar made with the same column,
covariates and cohort values; another one replaces it only with --overwrite.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import h5py
import pandas as pd

from greyarray.bids import citation
from greyarray.bids.run import Run
from greyarray.errors import OutputError, UsageError
from greyarray.io.inputs import open_hdf5

log = logging.getLogger("greyarray")
SUFFIX = "_combat"


def wanted(settings: Run) -> bool:
    return bool(getattr(settings.args, "harmonize", None))


def output_name(scalar: str) -> str:
    return f"{scalar}{SUFFIX}"


def covariates(settings: Run) -> str:
    """--harmonize-covariates, else the --model's right-hand side (smooths as s(x)), else
    none."""
    args = settings.args
    if args.harmonize_covariates is not None:
        return args.harmonize_covariates
    if not args.model:
        return ""
    from greyarray.stats.gam import parse_gam_formula

    formula = parse_gam_formula(args.model)
    terms = []
    for smooth in formula.smooths:
        if smooth.kind != "s" or len(smooth.variables) != 1:
            raise UsageError(
                f"--model {args.model!r}: {smooth.term} has no ComBat-GAM counterpart; give "
                "--harmonize-covariates (e.g. s(age) + s(edu))"
            )
        terms += [f"s({smooth.variables[0]})", *([smooth.by] if smooth.by else [])]
    terms += [t for t in formula.parametric if t not in ("1", "0", "-1")]
    terms = [t for t in terms if not _names(t, args.harmonize)]  # the batch is not kept
    return " + ".join(terms)


def _names(term: str, column: str) -> bool:
    return bool(re.search(rf"(?<![\w.]){re.escape(column)}(?![\w.])", term))


def check(settings: Run) -> Callable[[pd.DataFrame], None] | None:
    """A check of a cohort table before anything is converted: the batch column is there,
    every batch has enough subjects, the covariates can be kept."""
    if not wanted(settings):
        return None
    from greyarray.stats.combat import Options, build_model

    terms = covariates(settings)
    if settings.args.model and settings.args.harmonize_covariates is not None:
        _warn_unprotected(settings.args.model, terms, settings.args.harmonize)
    if not terms:
        log.warning(
            "Harmonising by %s without covariates: effects that differ between sites (age, "
            "sex...) are removed with them; give --harmonize-covariates",
            settings.args.harmonize,
        )

    def check_table(table: pd.DataFrame) -> None:
        build_model(table, settings.args.harmonize, terms, Options(), "scalar", "the cohort")

    return check_table


def _warn_unprotected(model: str, terms: str, batch: str) -> None:
    from greyarray.stats.gam import parse_gam_formula

    formula = parse_gam_formula(model)
    kept = parse_gam_formula(f"y ~ {terms}") if terms else None
    variables = (
        {v for s in kept.smooths for v in s.variables} | set(kept.parametric) if kept else set()
    )
    missing = [
        t
        for t in [*(v for s in formula.smooths for v in s.variables), *formula.parametric]
        if t not in variables and f"s({t})" not in terms and not _names(t, batch)
    ]
    if missing:
        log.warning(
            "--model terms %s are not among --harmonize-covariates %r: ComBat may remove part "
            "of their effect where they differ between sites",
            ", ".join(missing),
            terms,
        )


def combined(
    first: Callable[[pd.DataFrame], None] | None, second: Callable[[pd.DataFrame], None] | None
):
    """Both checks of a cohort table (either may be None)."""
    checks = [c for c in (first, second) if c is not None]
    if not checks:
        return None

    def check_table(table: pd.DataFrame) -> None:
        for each in checks:
            each(table)

    return check_table


def harmonize_scalar(settings: Run, h5: Path, csv: Path, scalar: str) -> tuple[str, str]:
    """Harmonise ``scalar`` of the group HDF5 ``h5`` (or keep an identical earlier one);
    returns (harmonised scalar name, summary line)."""
    from greyarray.stats.combat import Options, build_model
    from greyarray.stats.design import match_cohort
    from greyarray.stats.harmonization import Request, harmonize, used_columns

    out, column, terms = output_name(scalar), settings.args.harmonize, covariates(settings)
    earlier = _earlier(h5, out)
    if earlier is not None:
        with open_hdf5(h5) as file:
            names = list(file[f"scalars/{scalar}/column_names"].asstr()[()])
        table = match_cohort(pd.read_csv(csv), names, scalar, csv)
        model = build_model(table, column, terms, Options(), scalar, str(csv))
        now = used_columns(table, model).to_csv(index=False)
        about, stored_table = earlier
        same = (
            about.get("batch_column") == column
            and about.get("covariates") == model.covariates
            and about.get("input_scalar") == scalar
            and not about.get("applied_from")
            and stored_table == now
        )
        if same:
            log.info("%s: scalars/%s harmonised earlier with these settings; kept", h5, out)
            record(settings, scalar, out, about)
            return out, _line(scalar, out, about, "kept")
        if not settings.args.overwrite:
            raise OutputError(
                f"{h5}: scalars/{out} was harmonised with other settings or cohort values; use "
                "--overwrite to harmonise again"
            )
        with open_hdf5(h5) as file:
            fitted = sorted(file.get("results", {}))
        if fitted:
            log.warning(
                "%s: results %s may have been fitted to the earlier scalars/%s; fit them again",
                h5,
                ", ".join(fitted),
                out,
            )
    done = harmonize(
        Request(
            h5,
            csv,
            scalar,
            out,
            batch=column,
            covariates=terms,
            overwrite=earlier is not None,
            nprocs=settings.args.nprocs,
            command_line=settings.command_line,
        )
    )
    record(settings, scalar, out, done.about, done.gaps)
    return out, _line(scalar, out, done.about, "written")


def _earlier(h5: Path, out: str) -> tuple[dict, str] | None:
    with open_hdf5(h5) as file:
        group = file.get(f"greyarray/harmonization/{out}")
        if not isinstance(group, h5py.Group) or f"scalars/{out}" not in file:
            return None
        try:
            return json.loads(group.attrs["about"]), bytes(group["covariates_table"][0]).decode()
        except (KeyError, ValueError, TypeError):
            return {}, ""


def _line(scalar: str, out: str, about: dict, state: str) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in about.get("subjects_per_batch", {}).items())
    kept = about.get("covariates") or "none"
    return (
        f"  {scalar}: harmonised by {about.get('batch_column')} ({about.get('method')}; "
        f"{counts}; covariates kept: {kept}) as scalars/{out}, {state}"
    )


def record(settings: Run, scalar: str, out: str, about: dict, gaps: list[str] = ()) -> None:
    """The methods text's paragraph on this harmonisation (boilerplate/harmonization.md)."""
    citation.update(settings.logs, harmonization=methods_facts(scalar, out, about, list(gaps)))


def methods_facts(scalar: str, out: str, about: dict, gaps: list[str]) -> dict:
    counts = about.get("subjects_per_batch", {})
    smooth = about.get("smooth") or []
    options = about.get("options", {})
    how = (
        "parametric empirical Bayes estimates of the site effects"
        if options.get("eb", True) and options.get("parametric", True)
        else about.get("options_text", "")
    )
    covariate_text = (
        f"while keeping the effects of `{about['covariates']}` (the covariates' design columns "
        f"{', '.join(c for c in about.get('columns', [])[len(counts) :])})"
        if about.get("covariates")
        else "without covariates"
    )
    gam_text = (
        f" The effects of {', '.join(smooth)} were modelled as smooth functions (ComBat-GAM "
        "[@pomponio2020]): cubic B-splines with 10 degrees of freedom and a second-derivative "
        "penalty whose weight was chosen per element by 5-fold cross-validation over "
        "10^0..10^7, as neuroHarmonize 2.5.2 fits them (seed "
        f"{options.get('seed', 0)})."
        if smooth
        else ""
    )
    return {
        "scalar": scalar,
        "output": out,
        "batch": about.get("batch_column", ""),
        "n_batches": len(counts),
        "batches_text": ", ".join(f"{k} (n = {v})" for k, v in counts.items()),
        "method": about.get("method", "ComBat"),
        "how": how,
        "covariate_text": covariate_text,
        "gam_text": gam_text,
        "reproduces": about.get("reproduces", "neuroCombat 0.2.12"),
        "gaps_text": (" " + " ".join(g[0].upper() + g[1:] + "." for g in gaps)) if gaps else "",
    }

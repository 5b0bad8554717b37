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
from greyarray.errors import MissingInputError, OutputError, UsageError
from greyarray.io.inputs import open_hdf5

log = logging.getLogger("greyarray")
SUFFIX = "_combat"
GROUP = "greyarray/harmonization"  # stats/harmonization.py's


def wanted(settings: Run) -> bool:
    return bool(getattr(settings.args, "harmonize", None))


def output_name(scalar: str) -> str:
    return f"{scalar}{SUFFIX}"


def options_text(settings: Run) -> str:
    """The --harmonize options of this run, as a command line takes them ('' without)."""
    import shlex

    if not wanted(settings):
        return ""
    text = f" --harmonize {shlex.quote(settings.args.harmonize)}"
    if settings.args.harmonize_covariates is not None:
        text += f" --harmonize-covariates {shlex.quote(settings.args.harmonize_covariates)}"
    return text


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
    if settings.args.model:
        _warn_batch_tested(settings.args.model, settings.args.harmonize)
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


def _warn_batch_tested(model: str, batch: str) -> None:
    """A --model with the batch column in a term is fitted to values whose batch effects
    ComBat removed: those terms are near zero by construction."""
    from greyarray.stats.gam import parse_gam_formula

    formula = parse_gam_formula(model)
    terms = [*(s.term for s in formula.smooths), *formula.parametric]
    tested = [t for t in terms if _names(t, batch)]
    if tested:
        log.warning(
            "--model %r: %s has the --harmonize column %s, whose effects ComBat removed from the "
            "harmonised scalar the model is fitted to (near zero by construction there); test "
            "%s on the converted scalar, without --harmonize",
            model,
            ", ".join(tested),
            batch,
            batch,
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


def harmonize_scalar(
    settings: Run, h5: Path, csv: Path, scalar: str, refit: str | None = None
) -> tuple[str, str]:
    """Harmonise ``scalar`` of the group HDF5 ``h5`` (or keep an identical earlier one);
    returns (harmonised scalar name, summary line). An earlier harmonised scalar made
    otherwise is replaced only with --overwrite, and the results fitted to it (but ``refit``,
    the analysis this run fits again) only with --discard-results, which removes them and the
    maps exported from them: results are never silently left describing other values."""
    from greyarray.stats.harmonization import Request, harmonize
    from greyarray.stats.results import fitted_to

    out, column, terms = output_name(scalar), settings.args.harmonize, covariates(settings)
    earlier = _earlier(h5, out)
    stale: list[str] = []
    if earlier is not None:
        about = earlier[0]
        if _unchanged(settings, h5, csv, scalar, earlier):
            log.info("%s: scalars/%s harmonised earlier with these settings; kept", h5, out)
            record(settings, scalar, out, about)
            return out, _line(scalar, out, about, "kept")
        if getattr(settings.args, "merge_shards", None) is not None:
            raise OutputError(
                f"{h5}: scalars/{out} was harmonised with other settings or cohort values, and "
                "the permutation shards were computed on it; run the group level, the shards "
                "and the merge with the same --harmonize options"
            )
        if not settings.args.overwrite:
            raise OutputError(
                f"{h5}: scalars/{out} was harmonised with other settings or cohort values; use "
                "--overwrite to harmonise again"
            )
        with open_hdf5(h5) as file:
            stale = fitted_to(file, out)[0]
        if [a for a in stale if a != refit] and not settings.args.discard_results:
            raise OutputError(
                f"{h5}: results {', '.join(stale)} were fitted to scalars/{out}, which these "
                "settings would replace; it was left as it is. Use --discard-results to "
                "harmonise again (removing those results and the maps exported from them)"
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
            discard_results=bool(stale),
            nprocs=settings.args.nprocs,
            command_line=settings.command_line,
        )
    )
    if done.discarded:
        from greyarray.bids import derivatives

        removed = derivatives.exported_statmaps(h5.parent, h5.name, set(done.discarded))
        for path in removed:
            path.unlink(missing_ok=True)
        citation.update(settings.logs, discarded=(scalar, done.discarded))
        log.warning(
            "%s: scalars/%s harmonised again; results %s discarded, with the %d statistical "
            "map files exported from them",
            h5,
            out,
            ", ".join(done.discarded),
            len(removed),
        )
    record(settings, scalar, out, done.about, done.gaps)
    return out, _line(scalar, out, done.about, "written")


def _unchanged(settings: Run, h5: Path, csv: Path, scalar: str, earlier: tuple[dict, str]):
    """Whether the earlier harmonised scalar was made with this column, these covariates and
    the cohort values of now."""
    from greyarray.stats.combat import Options, build_model
    from greyarray.stats.design import match_cohort
    from greyarray.stats.harmonization import used_columns

    about, stored_table = earlier
    with open_hdf5(h5) as file:
        names = list(file[f"scalars/{scalar}/column_names"].asstr()[()])
    table = match_cohort(pd.read_csv(csv), names, scalar, csv)
    model = build_model(table, settings.args.harmonize, covariates(settings), Options(), scalar,
                        str(csv))  # fmt: skip
    return (
        about.get("batch_column") == settings.args.harmonize
        and about.get("covariates") == model.covariates
        and about.get("input_scalar") == scalar
        and not about.get("applied_from")
        and stored_table == used_columns(table, model).to_csv(index=False)
    )


def check_earlier(settings: Run, h5: Path, csv: Path, scalar: str) -> str:
    """The harmonised scalar a permutation shard reads: made earlier by the group level with
    these settings (a shard never harmonises: K of them start at once)."""
    out = output_name(scalar)
    earlier = _earlier(h5, out)
    if earlier is None or not _unchanged(settings, h5, csv, scalar, earlier):
        raise MissingInputError(
            f"{h5}: no scalars/{out} harmonised with these --harmonize options; run the group "
            "level with them first (the shards permute the harmonised scalar it writes)"
        )
    return out


def _earlier(h5: Path, out: str) -> tuple[dict, str] | None:
    with open_hdf5(h5) as file:
        group = file.get(f"greyarray/harmonization/{out}")
        if not isinstance(group, h5py.Group) or f"scalars/{out}" not in file:
            return None
        try:
            return json.loads(group.attrs["about"]), bytes(group["covariates_table"][0]).decode()
        except (KeyError, ValueError, TypeError):
            return {}, ""


def harmonization_record(h5: h5py.File, scalar: str) -> dict | None:
    """How ``scalar`` of ``h5`` was harmonised, for sidecars (BIDS-style keys); None when it
    holds no harmonised scalar of that name."""
    group = h5.get(f"{GROUP}/{scalar}")
    if not isinstance(group, h5py.Group) or f"scalars/{scalar}" not in h5:
        return None
    try:
        about = json.loads(group.attrs["about"])
    except (KeyError, TypeError, ValueError):
        about = None
    if not isinstance(about, dict):
        return {"Method": "unknown (the record of the harmonisation is damaged)"}
    record = {
        "InputScalar": about.get("input_scalar"),
        "Method": about.get("method"),
        "Reproduces": about.get("reproduces"),
        "BatchColumn": about.get("batch_column"),
        "SubjectsPerBatch": about.get("subjects_per_batch"),
        "Covariates": about.get("covariates") or "none",
        "Options": about.get("options"),
        "OptionsDescription": about.get("options_text"),
        "Elements": about.get("elements"),
        "AppliedFrom": about.get("applied_from"),
    }
    return {key: value for key, value in record.items() if value is not None}


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

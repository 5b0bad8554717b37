"""The group level's analyses: ``--model`` fits at every element, ``--analysis-name`` exports.

``group --model FORMULA`` converts the response scalar (with the group level's rules: nothing of
the user's is replaced), fits, and exports BIDS statistical maps. ``group --analysis-name NAME``
exports what ModelArray's ``writeResults`` (or GreyArray) wrote into ``results/NAME``. Each
analysis adds its section to the methods text, and group.html is rebuilt with every analysis.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from functools import partial
from pathlib import Path

import numpy as np

from greyarray.bids import citation, derivatives, discover, group, reports
from greyarray.bids.run import Run
from greyarray.errors import DataError, MissingInputError, OutputError, UsageError
from greyarray.io.fileio import check_writable
from greyarray.io.h5read import read_scalar
from greyarray.io.inputs import open_hdf5
from greyarray.options import permutation_options

log = logging.getLogger("greyarray")


def model(settings: Run) -> int:
    """Convert (unless the response's HDF5 exists), fit, export: the whole pipeline."""
    from greyarray.bids import harmonize
    from greyarray.stats.design import parse_formula, random_effect_terms
    from greyarray.stats.gam import is_gam_formula

    formula = settings.args.model
    response, _ = parse_formula(formula)
    kind = "lmm" if random_effect_terms(formula) else "gam" if is_gam_formula(formula) else "lm"
    analysis = settings.args.analysis_name or kind
    h5 = group.h5_path(settings, response)
    permutations = _permutations(settings, h5, analysis)
    fit, check_table = _fitter(settings, formula, kind, permutations)
    check_table = harmonize.combined(check_table, harmonize.check(settings))
    if permutations is not None and permutations.shard is not None:
        return _shard(settings, h5, response, fit, formula, analysis, permutations.shard)
    if h5.exists() and not settings.args.overwrite:
        log.info("Using %s (converted earlier; --overwrite checks its inputs again)", h5)
        _check_can_fit(h5, response, analysis, settings.args.overwrite)
        settings.open_output("model")
    else:
        naming = settings.find("group")
        if response not in naming.scalars:
            raise UsageError(
                f"the model's response {response!r} is not a scalar "
                f"(scalars: {', '.join(naming.scalars)})"
            )
        only = type(naming)({response: naming.scalars[response]}, naming.skipped)
        group.convert(settings, only, check_table, "model")
        _check_can_fit(h5, response, analysis, settings.args.overwrite)
    cohort = h5.with_name(h5.name.replace("_modelarray.h5", "_cohort.csv"))
    scalar, lines = response, []
    if harmonize.wanted(settings):  # the model is fitted to the harmonised scalar
        scalar, line = harmonize.harmonize_scalar(settings, h5, cohort, response, analysis)
        lines = [f"Harmonised by {settings.args.harmonize}:", line, ""]
    columns = fit(h5, cohort, formula, analysis, overwrite=settings.args.overwrite, scalar=scalar)
    maps = _export(settings, analysis, {response})
    return _finish(
        settings,
        [
            *lines,
            f"Exported {len(maps)} statistical maps to {settings.group_dir}"
            + (f" (model fitted to {scalar})" if scalar != response else ""),
            *_significance(h5, analysis, formula, columns),
        ],
    )


def _permutations(settings: Run, h5: Path, analysis: str):
    """The permutation options; with --merge-shards K, the K files the shards saved."""
    permutations = permutation_options(settings.args)
    if (count := settings.args.merge_shards) is not None:
        from dataclasses import replace

        from greyarray.stats.permutation import shard_path

        files = tuple(shard_path(h5, analysis, (i, count)) for i in range(1, count + 1))
        permutations = replace(permutations, merge=files)
    return permutations


def _shard(settings: Run, h5: Path, scalar: str, fit, formula: str, analysis: str, shard) -> int:
    """One shard of the permutations (a SLURM array task): from the group level's HDF5, which
    is never converted here (K tasks start at once), to a file beside it."""
    from greyarray.stats.permutation import shard_path

    if not h5.exists():
        raise MissingInputError(
            f"{h5}: not found; --permutation-shard reads the HDF5 of an earlier group run "
            "(run the group level first)"
        )
    from greyarray.bids import harmonize

    cohort = h5.with_name(h5.name.replace("_modelarray.h5", "_cohort.csv"))
    if harmonize.wanted(settings):  # the shards permute what the model is fitted to: the
        scalar = harmonize.check_earlier(settings, h5, cohort, scalar)  # group run's scalar
    with open_hdf5(h5) as file:
        read_scalar(file, scalar)
    settings.open_output("shard")
    fit(h5, cohort, formula, analysis, overwrite=settings.args.overwrite, scalar=scalar)
    i, k = shard
    return settings.finish(
        [f"Shard {i} of {k} of the permutations of {formula}: {shard_path(h5, analysis, shard)}"]
    )


BLOCKS_ADVICE = "whole participants are permuted, as PALM advises for repeated measures"


def _default_blocks(permutations, table, rows):
    """With repeated sessions and no --exchangeability-blocks: participant_id blocks."""
    from greyarray.stats.design import PARTICIPANT

    if permutations is None or permutations.blocks is not None:
        return permutations
    if PARTICIPANT not in table.columns or not table[PARTICIPANT].iloc[rows].duplicated().any():
        return permutations
    return dataclasses.replace(permutations, blocks=PARTICIPANT)


def _fitter(settings: Run, formula: str, kind: str, permutations):
    """(fit(h5, cohort, formula, analysis, overwrite), check of a cohort table before any
    conversion): fit-lm's, fit-gam's for a formula with smooth terms s(...), fit-lmm's for one
    with random effects (... | group)."""
    references, ordered = settings.reference_levels, settings.ordered_factors
    factors = {"reference_levels": references, "ordered_factors": ordered}
    args = settings.args
    thresholds = {"lthr_abs": args.num_subj_lthr_abs, "lthr_rel": args.num_subj_lthr_rel}
    if kind == "lmm":
        if permutations is not None:
            raise UsageError(
                "--permutations applies to linear models without random effects, not to a "
                "mixed --model (its Satterthwaite t tests are in the results)"
            )
        from greyarray.stats.lmm import MixedModel, fit_lmm

        return (
            partial(fit_lmm, **factors, **thresholds, nprocs=args.nprocs),
            lambda table: MixedModel(formula, table, True, references, ordered),
        )
    if kind == "lm":
        from greyarray.stats.design import build_design
        from greyarray.stats.lm import check_model, fit_lm
        from greyarray.stats.permutation import exchangeable_units

        def check_lm(table) -> None:
            check_model(formula)
            design = build_design(formula, table, references, ordered)
            chosen = _default_blocks(permutations, table, design.rows)
            if chosen is not None and chosen.blocks is not None:
                where = "the cohort" + (
                    f" ({BLOCKS_ADVICE}, by default with repeated sessions)"
                    if permutations.blocks is None
                    else ""
                )
                exchangeable_units(table, design.rows, chosen.blocks, where)

        def fit(h5, cohort, formula_, analysis, overwrite, scalar=None):
            chosen = permutations
            if permutations is not None and permutations.blocks is None:
                from greyarray.io.cohort import read_csv_table

                table = read_csv_table(cohort, "cohort file")
                design = build_design(formula_, table, references, ordered)
                chosen = _default_blocks(permutations, table, design.rows)
                if chosen.blocks is not None:
                    log.info(
                        "Permutations: participants have several sessions, so %s "
                        "(exchangeability blocks %s; --exchangeability-blocks chooses others)",
                        BLOCKS_ADVICE,
                        chosen.blocks,
                    )
            return fit_lm(
                h5, cohort, formula_, analysis, overwrite=overwrite, permutations=chosen,
                scalar=scalar, **factors, **thresholds,
            )  # fmt: skip

        return fit, check_lm
    if permutations is not None:
        raise UsageError("--permutations applies to linear models, not to a --model with s()")
    from greyarray.stats.gam import GamModel, changed_term_name, fit_gam, parse_gam_formula

    method, changed = settings.args.gam_method, settings.args.changed_rsq_term
    if changed is not None:
        changed_term_name(parse_gam_formula(formula), changed)  # a usage error, before any work
    return (
        partial(fit_gam, method=method, changed_rsq_term=changed, **factors, **thresholds),
        lambda table: GamModel(parse_gam_formula(formula), table, method, references, ordered),
    )


def _check_can_fit(h5: Path, scalar: str, analysis: str, overwrite: bool) -> None:
    """Fail before anything is written when the fit could not be stored."""
    check_writable(h5)
    with open_hdf5(h5) as file:
        read_scalar(file, scalar)
        if f"results/{analysis}" in file and not overwrite:
            raise OutputError(
                f"{h5}: results/{analysis} exists; use --overwrite to fit it again, or "
                "--analysis-name to keep both"
            )
        key = derivatives.analysis_label(analysis)
        for other in file.get("results", {}):
            if other != analysis and derivatives.analysis_label(other) == key:
                raise OutputError(
                    f"{h5}: analysis {analysis!r} would export to the file names of its "
                    f"analysis {other!r}; choose another --analysis-name"
                )


def export(settings: Run) -> int:
    maps = _export(settings, settings.args.analysis_name, set(settings.args.scalar or []))
    return _finish(settings, [f"Exported {len(maps)} statistical maps to {settings.group_dir}"])


def _finish(settings: Run, lines: list[str]) -> int:
    """The summary, after group.html is rebuilt with every analysis on disk (unless
    --no-report)."""
    if reports.wanted(settings):
        lines += [*reports.group_report(settings), "", reports.report_line(settings)]
    return settings.finish(lines)


def _export(settings: Run, analysis: str, scalars: set[str]) -> list[Path]:
    """Statistical maps of results/<analysis> of every group HDF5 that has it."""
    found, known = [], []
    for h5_path in sorted(settings.group_dir.glob("desc-*_modelarray.h5")):
        meta = _sidecar(h5_path)
        known.append(meta["Scalar"])
        if scalars and meta["Scalar"] not in scalars:
            continue
        with open_hdf5(h5_path) as h5:
            if analysis in h5.get("results", {}):
                found.append((h5_path, meta, _about(h5, analysis, meta)))
    if known and (unknown := sorted(scalars - set(known))):
        raise UsageError(
            f"{settings.group_dir}: no scalar {', '.join(unknown)} (scalars converted: "
            f"{', '.join(known)})"
        )
    if not found:
        if not settings.group_dir.is_dir() or not any(settings.group_dir.glob("*.h5")):
            raise MissingInputError(
                f"{settings.group_dir}: no *_modelarray.h5; run the group level first"
            )
        raise DataError(
            f"{settings.group_dir}: no HDF5 holds results/{analysis} "
            "(run ModelArray and writeResults first)"
        )
    if settings.log_file is None:
        settings.open_output("export")
    paths = []
    for h5_path, meta, about in found:
        maps = derivatives.write_statmaps(
            h5_path, meta, analysis, about, overwrite=settings.args.overwrite
        )
        paths += maps
        section = _section(meta, analysis, about, len(maps))
        if any(discover.is_volume(path) for path in maps):
            section.update(format_text="NIfTI", element_text="voxel of the group mask")
        citation.update(settings.logs, analysis=section)
    return paths


def _sidecar(h5_path: Path) -> dict:
    try:
        return json.loads(h5_path.with_suffix(".json").read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{h5_path.with_suffix('.json')}: cannot read ({err})") from None


def _about(h5, analysis: str, meta: dict) -> dict:
    """What the sidecars say about the fit: from GreyArray's record, else what the file shows.
    ``Scalar`` is the scalar the model was fitted to (the harmonised one, with how it was
    harmonised), which replaces the HDF5's own in the sidecars."""
    from greyarray.bids.harmonize import harmonization_record
    from greyarray.stats.results import fit_record

    record = fit_record(h5["results"][analysis])
    scalar = record.get("scalar") or meta["Scalar"]
    if f"scalars/{scalar}" not in h5:  # a record of a scalar removed since
        scalar = meta["Scalar"]
    n = len(read_scalar(h5, scalar).names)
    about = {
        "Scalar": scalar,
        "Model": record.get(
            "formula", "not recorded (fitted outside GreyArray, e.g. by ModelArray in R)"
        ),
        "FittedBy": "GreyArray" if record else "not recorded",
        "NumberOfRows": n,
        "ElementThreshold": record.get("threshold")
        or f"ModelArray's default: an element is fitted only where more than max(10, 0.2 x "
        f"{n}) participants have a finite value",
    }
    if record.get("permutations"):
        about["Permutations"] = record["permutations"]
    if record.get("method"):
        about["Method"] = record["method"]
    if record.get("smoothing"):
        about["Smoothing"] = record["smoothing"]
    if "n_with_phenotypes" in record:
        about["NumberOfRowsWithPhenotypes"] = record["n_with_phenotypes"]
    if record.get("reference_levels"):
        about["ReferenceLevels"] = record["reference_levels"]
    if record.get("ordered_factors"):
        about["OrderedFactors"] = record["ordered_factors"]
    if record.get("offset"):
        about["Offset"] = record["offset"]
    if record.get("aliased_columns_left_out"):
        about["AliasedColumnsLeftOut"] = record["aliased_columns_left_out"]
    if record.get("method") == "lmm":
        about["Criterion"] = record.get("criterion", "REML")
        about["RandomEffects"] = record.get("random_effects", [])
        about["Groups"] = record.get("groups", {})
        about["DegreesOfFreedom"] = "Satterthwaite, as lmerTest computes them"
    if record.get("notes"):  # repeated sessions, unfitted elements, empty columns, ...
        about["Warnings"] = record["notes"]
    if (harmonized := harmonization_record(h5, scalar)) is not None:
        about["Harmonization"] = harmonized
    elif (other := _harmonized_from(h5, scalar)) is not None:
        about["NotHarmonized"] = (
            f"fitted to {scalar} as converted; the HDF5 also holds {other}, harmonised from it"
        )
    return about


def _harmonized_from(h5, scalar: str) -> str | None:
    """A harmonised scalar of the HDF5 made from ``scalar``, if any."""
    from greyarray.bids.harmonize import harmonization_record

    for name in h5.get("scalars", {}):
        record = harmonization_record(h5, name)
        if record is not None and record.get("InputScalar") == scalar:
            return name
    return None


def _section(meta: dict, analysis: str, about: dict, n_maps: int) -> dict:
    model_text = ""
    if about.get("FittedBy") == "GreyArray" and about.get("Method") == "gam":
        model_text = (
            f"At every element, the generalized additive model `{about['Model']}` (Gaussian, "
            f"smoothing parameters by {about.get('Smoothing', 'GCV.Cp')}) was fitted with "
            "GreyArray, which reproduces mgcv's bases, smoothing parameter estimation and "
            "tests [@mgcv; @wood2013] as ModelArray.gam runs them [@modelarray]: "
            f"{about['ElementThreshold']}, participants with a missing phenotype were left out, "
            "and p-values were corrected for the false discovery rate over elements [@bh1995].\n"
        )
    elif about.get("FittedBy") == "GreyArray" and about.get("Method") == "lmm":
        model_text = _mixed_model_text(about)
    elif about.get("FittedBy") == "GreyArray":
        reference = _reference_text(about)
        model_text = (
            f"At every element, the linear model `{about['Model']}` was fitted by ordinary "
            "least squares with GreyArray, following ModelArray.lm's rules [@modelarray]: "
            f"{about['ElementThreshold']}, participants with a missing phenotype were left out, "
            "and p-values were corrected for the false discovery rate over elements "
            f"[@bh1995].{reference}{_permutation_text(about.get('Permutations'))}\n"
        )
    return {
        "scalar": meta["Scalar"],
        "analysis": analysis,
        "model_text": model_text,
        "fitted_text": _fitted_text(meta["Scalar"], about),
        "n_maps": n_maps,
    }


def _fitted_text(scalar: str, about: dict) -> str:
    """Which values the model was fitted to, when the HDF5 holds a harmonised scalar."""
    fitted, harmonized = about.get("Scalar", scalar), about.get("Harmonization")
    if harmonized:
        method, batch = harmonized.get("Method", "ComBat"), harmonized.get("BatchColumn")
        return (
            f"The model was fitted to the harmonized values, `{fitted}` ({method} by `{batch}`, "
            f"above), not to the converted `{scalar}`.\n"
        )
    if about.get("NotHarmonized"):
        return f"The model was fitted to the values of `{fitted}` as converted, not harmonized.\n"
    return ""


def _reference_text(about: dict) -> str:
    """The sentence on factor coding, when the model has factors."""
    levels = about.get("ReferenceLevels") or {}
    if not levels:
        return ""
    return (
        " Factors were coded with treatment contrasts against the reference levels "
        + ", ".join(f"{k} = {v}" for k, v in levels.items())
        + " (R's level order unless chosen)."
    )


def _mixed_model_text(about: dict) -> str:
    """The methods paragraph of a mixed model fitted by fit-lmm."""
    how = (
        "restricted maximum likelihood (REML)"
        if about.get("Criterion", "REML") == "REML"
        else "maximum likelihood (ML)"
    )
    terms = "; ".join(
        f"`({t['term']})` ({', '.join(t['coefficients'])} per level of "
        f"{t['term'].split('|', 1)[1].strip()})"
        for t in about.get("RandomEffects", [])
    )
    groups = ", ".join(f"{n:,} levels of {g}" for g, n in about.get("Groups", {}).items())
    rows = about.get("NumberOfRowsWithPhenotypes", about["NumberOfRows"])
    return (
        f"At every element, the linear mixed model `{about['Model']}` was fitted by {how} "
        "with GreyArray, which computes lme4's profiled criterion and estimates [@lme4] for "
        f"all elements at once. Random effects: {terms}; {groups}, {rows:,} observations. "
        "Fixed effects were tested by t tests with Satterthwaite's degrees of freedom "
        "[@satterthwaite1946] as lmerTest computes them [@lmertest]; "
        f"{about['ElementThreshold'].replace('participants', 'observations')}, observations "
        "with a missing phenotype were left out, and p-values were corrected for the false "
        f"discovery rate over elements [@bh1995].{_reference_text(about)}\n"
    )


def _permutation_text(options: dict | None) -> str:
    if not options:
        return ""
    blocks = options.get("exchangeability_blocks")
    text = (
        f" The family-wise error rate over elements was controlled by {options['n']:,} "
        "permutations of the data (Freedman-Lane [@freedmanlane1983]; two-sided maximum "
        "statistic over elements, the unpermuted data counted as one permutation, as in PALM "
        "[@winkler2014]"
        + (f"; blocks of `{blocks}` permuted whole" if blocks else "")
        + f"; seed {options.get('seed', 0)})."
    )
    if options.get("tfce"):
        text += (
            " Threshold-free cluster enhancement [@tfce] was computed on the elements "
            "(H = 2, E = 1 with vertex areas of the fsLR 32k midthickness surface; H = 2, E = 0.5 "
            f"with {options.get('tfce_connectivity', 26)}-neighbour voxels; CIFTI structures "
            "never connected) and its maximum was compared in the same permutations."
        )
    return text


def _significance(h5_path: Path, analysis: str, formula: str, columns: list[str]) -> list[str]:
    from greyarray.stats.results import fit_record

    with open_hdf5(h5_path) as h5:
        table = h5[f"results/{analysis}/results_matrix"][()]
        notes = fit_record(h5["results"][analysis]).get("notes") or []
    fitted = int(np.isfinite(table[1:]).any(axis=0).sum())
    lines = [f"\nModel {formula}: fitted at {fitted:,} of {table.shape[1]:,} elements"]
    lines += [f"  WARNING: {note}" for note in notes]
    for i, name in enumerate(columns):
        if name.endswith(".p.value.fdr"):
            significant = int((table[i] < 0.05).sum())
            term = name.removesuffix(".p.value.fdr")
            lines.append(f"  {term}: {significant:,} elements with FDR-corrected p < 0.05")
    return lines

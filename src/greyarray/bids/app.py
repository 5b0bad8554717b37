"""The BIDS-App: ``greyarray BIDS_DIR OUTPUT_DIR participant|group [options]``.

participant: discover and check one subject's maps and write
``sub-<label>/sub-<label>_greyarray.json`` (safe as many parallel jobs on one OUTPUT_DIR).
group: write each scalar's cohort CSV and HDF5 under ``OUTPUT_DIR/group/``
(``desc-<scalar>_cohort.csv``, ``desc-<scalar>_modelarray.h5`` and a JSON sidecar).
group with ``--analysis-name``: export ModelArray's results of that analysis as BIDS statistical
maps in ``OUTPUT_DIR/group/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from greyarray import __version__
from greyarray.bids import derivatives, discover
from greyarray.errors import DataError, GreyArrayError, MissingInputError, OutputError, UsageError
from greyarray.io import cifti, sources
from greyarray.io.fileio import atomic_write, write_json
from greyarray.options import Parser, default_nprocs

log = logging.getLogger("greyarray")

EXAMPLES = """examples:
  greyarray /data/xcp_d /out participant --participant-label 01
  greyarray /data/xcp_d /out group
  greyarray /data/bids /out group --derivatives xcpd=/data/bids/derivatives/xcp_d --scalar alff
  greyarray /data/xcp_d /out group --analysis-name lm     # after ModelArray's writeResults

exit codes: 0 ok, 1 failure, 16 invalid input dataset, 17 unknown analysis level,
  18 filters matched no files, 64 usage, 65 bad data, 66 missing input, 73 cannot create output
"""


class UnknownLevelError(GreyArrayError):
    exit_code = 17


def build_parser() -> Parser:
    parser = Parser(
        prog="greyarray",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
        description="BIDS-App: discover CIFTI-2 dscalar/pscalar/pconn derivatives with pybids, "
        "write ModelArray's cohort CSV and HDF5, export its results as BIDS maps. "
        "Stand-alone commands: greyarray to-modelarray|export-results|demo --help.",
    )
    parser.add_argument("bids_dir", type=Path, help="BIDS dataset: raw or derivatives")
    parser.add_argument("output_dir", type=Path, help="output folder (a derivatives dataset)")
    parser.add_argument("analysis_level", help="participant or group")
    parser.add_argument("--version", action="version", version=f"greyarray {__version__}")
    select = parser.add_argument_group("selecting data")
    select.add_argument(
        "--participant-label",
        "--participant_label",
        nargs="+",
        metavar="LABEL",
        help="labels with or without 'sub-', or a file listing them",
    )
    select.add_argument(
        "--session-label",
        "--session_label",
        nargs="+",
        metavar="LABEL",
        help="sessions, with or without 'ses-'",
    )
    select.add_argument(
        "--derivatives",
        nargs="+",
        metavar="NAME=PATH",
        default=[],
        help="derivative datasets to search (default: BIDS_DIR itself when it "
        "is a derivative, else BIDS_DIR/derivatives/*)",
    )
    select.add_argument(
        "--participants-file",
        type=Path,
        help="phenotypes (default: participants.tsv of BIDS_DIR or of the raw dataset around it)",
    )
    select.add_argument(
        "--config",
        type=Path,
        help="YAML: named scalars (pybids filters) and "
        "regex patterns for non-BIDS names; see README",
    )
    select.add_argument(
        "--bids-filter-file",
        "--bids_filter_file",
        type=Path,
        metavar="FILE",
        help='JSON {"<scalar>": {entity: value}}; null = absent, "*" = any',
    )
    select.add_argument("--scalar", nargs="+", metavar="NAME", help="only these scalars")
    select.add_argument("--map", metavar="NAME|INDEX", help="map of multi-map files")
    run = parser.add_argument_group("running")
    run.add_argument(
        "-w",
        "--work-dir",
        type=Path,
        help="scratch folder, not inside BIDS_DIR (holds pybids' index unless "
        "--bids-database-dir is given)",
    )
    run.add_argument(
        "--bids-database-dir",
        type=Path,
        help="keep pybids' index here and reuse it (rebuilt when inputs change)",
    )
    run.add_argument("--nprocs", "--n-cpus", type=int, default=default_nprocs())
    run.add_argument("--overwrite", action="store_true", help="replace existing group outputs")
    run.add_argument(
        "--skip-bids-validation",
        "--skip_bids_validation",
        "--skip_bids_validator",
        action="store_true",
        help="accepted; GreyArray does not run the validator",
    )
    run.add_argument(
        "--analysis-name",
        metavar="NAME",
        help="group: export ModelArray's results of this analysis as BIDS maps (with --model: "
        "the name of the fitted analysis, default lm)",
    )
    run.add_argument(
        "--model",
        metavar="FORMULA",
        help="group: fit this linear model at every element (e.g. 'thickness ~ age + sex', "
        "the response being a scalar), as ModelArray.lm does, and export the maps",
    )
    run.add_argument("-v", "--verbose", action="count", default=0, help="more messages (-vv)")
    run.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", force=True)
    if args.analysis_level not in ("participant", "group"):
        raise UnknownLevelError(
            f"unknown analysis level {args.analysis_level!r}; use participant or group"
        )
    app = App(args, shlex.join(["greyarray", *argv]))
    return app.run()


class App:
    """One run of the BIDS-App: resolved options, then the level's work."""

    def __init__(self, args: argparse.Namespace, command_line: str):
        self.args = args
        self.command_line = command_line
        self.bids_dir = args.bids_dir.resolve()
        self.output_dir = args.output_dir.resolve()
        self._check_paths()
        self.config = _load_yaml(args.config) if args.config else {}
        self.queries = {**self.config.get("scalars", {}), **_load_json(args.bids_filter_file)}
        self.patterns = self.config.get("patterns", {})
        self.subjects = discover.participant_labels(args.participant_label)
        self.sessions = (
            sorted({discover.strip(s, "ses-") for s in args.session_label or []}) or None
        )
        self.derivatives = _named_paths(args.derivatives)
        work = args.work_dir.resolve() / "bids_db" if args.work_dir else None
        self.database_dir = args.bids_database_dir or work

    def _check_paths(self) -> None:
        if self.output_dir == self.bids_dir:
            raise UsageError("OUTPUT_DIR must not be BIDS_DIR: outputs would mix with inputs")
        work = self.args.work_dir
        if work and work.resolve().is_relative_to(self.bids_dir):
            raise UsageError(f"{work}: the work folder must not be inside BIDS_DIR")

    def run(self) -> int:
        roots = discover.dataset_roots(self.bids_dir, self.derivatives, bool(self.patterns))
        roots = [root for root in roots if root != self.output_dir]  # e.g. derivatives/greyarray
        try:
            derivatives.init_dataset(self.output_dir, [self.bids_dir])
        except OSError as err:
            raise OutputError(f"{self.output_dir}: cannot create output ({err.strerror})") from None
        self._log_to_file()
        if self.args.analysis_level == "participant":
            return self.participant(self.find(roots))
        if self.args.model:
            return self.model(roots)
        if self.args.analysis_name:
            return self.export()
        return self.group(self.find(roots))

    # ---- discovery -------------------------------------------------------------------------
    def find(self, roots: list[Path]) -> dict[str, list[discover.Found]]:
        found = self._from_manifests(roots) if self.args.analysis_level == "group" else None
        if found is None:
            found = []
            for root in tqdm(
                roots, desc="Indexing datasets", unit="dataset", disable=None, leave=False
            ):
                log.info("Indexing %s", root)
                found += discover.discover(
                    [root],
                    self.subjects,
                    self.sessions,
                    self.queries or None,
                    self.patterns,
                    self.database_dir,
                )
        self._check_selection(found, roots)
        scalars = discover.name_scalars(found)
        if self.args.scalar:
            unknown = sorted(set(self.args.scalar) - set(scalars))
            if unknown:
                raise discover.NoFilesError(
                    f"no scalar {', '.join(map(repr, unknown))} (found: {', '.join(scalars)})"
                )
            scalars = {name: scalars[name] for name in self.args.scalar}
        for name, files in scalars.items():
            log.info("Scalar %s: %d files, e.g. %s", name, len(files), files[0].relative)
        return scalars

    def _from_manifests(self, roots: list[Path]) -> list[discover.Found] | None:
        """The participant level's findings, if every subject folder of the inputs has a
        manifest made with the same selection; None means: discover again."""
        subjects = self.subjects or sorted(
            {p.name[4:] for root in roots for p in root.glob("sub-*") if p.is_dir()}
        )
        paths = [self.output_dir / f"sub-{s}" / f"sub-{s}_greyarray.json" for s in subjects]
        if not paths or not all(p.is_file() for p in paths):
            return None
        found = []
        for path in paths:
            manifest = json.loads(path.read_text())
            if manifest.get("selection") != self._selection():
                log.info("%s was made with other filters: discovering again", path)
                return None
            for entry in manifest["files"]:
                item = discover.Found(
                    Path(entry["dataset"]) / entry["path"],
                    Path(entry["dataset"]),
                    manifest["participant_id"][4:],
                    entry["session"],
                    entry["entities"],
                    entry["query"],
                )
                if not item.path.is_file():
                    log.info("%s is gone: discovering again", item.path)
                    return None
                found.append(item)
        log.info("Using the manifests of %d participants (participant level)", len(paths))
        return found

    def _check_selection(self, found: list[discover.Found], roots: list[Path]) -> None:
        where = ", ".join(map(str, roots))
        for subject in self.subjects or []:
            if not any(item.subject == subject for item in found):
                raise discover.NoFilesError(f"participant {subject} was not found in {where}")
        if not found:
            filters = {
                "participant_label": self.subjects,
                "session_label": self.sessions,
                "queries": self.queries or "all dscalar/pscalar/pconn files",
                "patterns": self.patterns or None,
            }
            raise discover.NoFilesError(
                f"filters matched no files in {where}: "
                f"{json.dumps({k: v for k, v in filters.items() if v})}"
            )

    # ---- participant level -----------------------------------------------------------------
    def participant(self, scalars: dict[str, list[discover.Found]]) -> int:
        by_subject: dict[str, list[tuple[str, discover.Found]]] = {}
        for name, files in scalars.items():
            for item in files:
                by_subject.setdefault(item.subject, []).append((name, item))
        for subject, items in tqdm(
            sorted(by_subject.items()),
            desc="Checking participants",
            unit="participant",
            disable=None,
            leave=False,
        ):
            manifest = {
                "participant_id": f"sub-{subject}",
                "greyarray_version": __version__,
                "selection": self._selection(),
                "files": [self._check(n, f) for n, f in items],
            }
            folder = self.output_dir / f"sub-{subject}"
            folder.mkdir(exist_ok=True)
            write_json(folder / f"sub-{subject}_greyarray.json", manifest)
        print(
            f"Checked {sum(len(v) for v in by_subject.values())} files of "
            f"{len(by_subject)} participant(s); manifests in {self.output_dir}/sub-*/"
        )
        return 0

    def _check(self, name: str, item: discover.Found) -> dict:
        source = sources.inspect(item.path, item.relative, self.args.map)
        if source.n_nonfinite:
            log.warning(
                "%s: %d non-finite values (missing for ModelArray)", item.path, source.n_nonfinite
            )
        return {
            "scalar": name,
            "query": item.scalar,
            "path": item.relative,
            "dataset": str(item.root),
            "session": item.session,
            "entities": item.entities,
            "kind": source.file.kind,
            "n_elements": source.file.geometry.n_elements,
            "map": source.map_name,
            "geometry_sha256": _sha(source.file.geometry.xml),
            "sha256": source.sha256,
            "nonfinite_count": source.n_nonfinite,
        }

    def _selection(self) -> dict:
        return {"queries": self.queries, "patterns": self.patterns, "sessions": self.sessions}

    # ---- group level -----------------------------------------------------------------------
    def group(self, scalars: dict[str, list[discover.Found]], summary: bool = True) -> int:
        import h5py

        from greyarray.io.cohort import Cohort, build_cohort, report_mismatch
        from greyarray.io.store import StoreOptions, to_modelarray

        group_dir = self.output_dir / "group"
        group_dir.mkdir(exist_ok=True)
        participants, sessions_table = self._phenotypes()
        if participants is not None:
            subjects = {f"sub-{f.subject}" for files in scalars.values() for f in files}
            ids = {_prefixed(i) for i in participants["participant_id"]}
            report_mismatch(subjects, ids)
        options = StoreOptions(nprocs=self.args.nprocs)
        planned = {
            name: group_dir / f"desc-{derivatives.label(name)}_modelarray.h5" for name in scalars
        }
        existing = [str(p) for p in planned.values() if p.exists()]
        if existing and not self.args.overwrite:
            raise OutputError(f"{existing[0]}: output exists; use --overwrite to replace it")
        written, nonfinite = {}, []
        for name, files in scalars.items():
            h5 = planned[name]
            csv = h5.with_name(h5.name.replace("_modelarray.h5", "_cohort.csv"))
            table = build_cohort({name: files}, group_dir, participants, sessions_table)
            cohort = Cohort.from_table(csv, table)
            to_modelarray(
                cohort,
                h5,
                options,
                wanted_map=self.args.map,
                overwrite=True,
                command_line=self.command_line,
            )
            atomic_write(csv, table.to_csv(index=False, na_rep="NA").encode())
            with h5py.File(h5, "r") as stored:
                nonfinite += list(stored[f"greyarray/sources/{name}/nonfinite_count"][()])
            sidecar = {
                "Scalar": name,
                "Entities": discover.common_entities(files),
                "Participants": table["participant_id"].nunique(),
                "Files": len(files),
                "CohortFile": csv.name,
                "Sources": sorted({str(f.root) for f in files}),
            }
            write_json(h5.with_suffix(".json"), sidecar)
            written[name] = (csv, h5, table)
        self._write_logs(scalars, options, nonfinite)
        if summary:
            self._summary(written)
        return 0

    def _phenotypes(self):
        from greyarray.io.cohort import read_table

        path = self.args.participants_file or _find_participants(self.bids_dir)
        if self.args.participants_file and not path.is_file():
            raise MissingInputError(f"{path}: participants file not found")
        participants = read_table(path) if path else None
        if participants is not None and "participant_id" not in participants:
            raise DataError(f"{path}: no participant_id column")
        if path is None:
            log.warning("No participants.tsv found: the cohort has no phenotype columns")
        tables = [
            read_table(p).assign(participant_id=p.parent.name)
            for p in sorted(self.bids_dir.glob("sub-*/sub-*_sessions.tsv"))
        ]
        sessions_table = None
        if tables:
            import pandas as pd

            sessions_table = pd.concat(tables, ignore_index=True)
        return participants, sessions_table

    def _write_logs(self, scalars: dict[str, list[discover.Found]], options, nonfinite: list):
        import h5py
        import nibabel
        from bids import __version__ as pybids_version

        logs = self.output_dir / "logs"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        derivatives.write_config(
            logs,
            f"config-{self.args.analysis_level}-{stamp}.yaml",
            {
                "command_line": self.command_line,
                "greyarray_version": __version__,
                "bids_dir": str(self.bids_dir),
                "output_dir": str(self.output_dir),
                "derivatives": {k: str(v) for k, v in self.derivatives.items()},
                "participant_label": self.subjects,
                "session_label": self.sessions,
                "queries": self.queries,
                "patterns": self.patterns,
                "scalars": list(scalars),
                "map": self.args.map,
                "storage": options.__dict__ if options else None,
                "analysis_name": self.args.analysis_name,
            },
        )
        files = [f for fs in scalars.values() for f in fs]
        n_sessions = len({(f.subject, f.session) for f in files if f.session})
        kinds = Counter(_kind(f.path) for f in files)
        entities = discover.common_entities(files)
        space = " ".join(f"{k}-{v}" for k, v in entities.items() if k in ("space", "den", "seg"))
        elements = sorted(
            {cifti.read_file(fs[0].path).geometry.n_elements for fs in scalars.values()}
        )
        facts = {
            "greyarray_version": __version__,
            "nibabel_version": nibabel.__version__,
            "h5py_version": h5py.__version__,
            "hdf5_version": h5py.version.hdf5_version,
            "pybids_version": pybids_version,
            "bids_version": derivatives.BIDS_VERSION,
            "n_files": len(files),
            "n_participants": len({f.subject for f in files}),
            "sessions_text": f" ({n_sessions} sessions)" if n_sessions else "",
            "datasets": ", ".join(sorted({str(f.root.name) for f in files})),
            "n_scalars": len(scalars),
            "scalars_text": ", ".join(scalars),
            "kinds_text": " or ".join(f"CIFTI-2 {k}" for k in sorted(kinds)),
            "space_text": space or "greyordinate space of the inputs",
            "n_elements": " or ".join(f"{n:,}" for n in elements),
            "nonfinite_text": _nonfinite_text(nonfinite),
            "storage_text": f"{options.description}, chunks of at most 1 MiB holding all "
            "participants",
        }
        write_json(logs / "citation-facts.json", facts)
        derivatives.write_citation(logs, facts)

    def _log_to_file(self) -> None:
        logs = self.output_dir / "logs"
        logs.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"greyarray-{self.args.analysis_level}-{stamp}-{os.getpid()}.log"
        handler = logging.FileHandler(logs / name)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        log.info("%s", self.command_line)

    def _summary(self, written: dict) -> None:
        lines = ["", "GreyArray group level done", ""]
        for name, (csv, h5, table) in written.items():
            sessions = table["session_id"].nunique() if "session_id" in table else 0
            lines.append(
                f"  {name}: {table['participant_id'].nunique()} participants"
                f"{f', {sessions} sessions' if sessions else ''}, {len(table)} files"
            )
            lines.append(f"    cohort: {csv}\n    HDF5:   {h5}")
        name, (csv, h5, _) = next(iter(written.items()))
        lines += [
            "",
            "Next, in R:",
            "  library(ModelArray)",
            f'  ma <- ModelArray("{h5}", scalar_types = "{name}")',
            f'  phen <- read.csv("{csv}")',
            f'  res <- ModelArray.lm({name} ~ age + sex, ma, phen, "{name}")',
            f'  writeResults("{h5}", df.output = res, analysis_name = "lm")',
            "Then export the maps:",
            f"  greyarray {self.bids_dir} {self.output_dir} group --analysis-name lm",
            "",
        ]
        print("\n".join(lines))

    # ---- group --model ---------------------------------------------------------------------
    def model(self, roots: list[Path]) -> int:
        """Convert (unless the response's HDF5 exists), fit, export: the whole pipeline."""
        from greyarray.stats.lm import fit_lm, parse_formula

        response, _ = parse_formula(self.args.model)
        self.args.analysis_name = self.args.analysis_name or "lm"
        h5 = self.output_dir / "group" / f"desc-{derivatives.label(response)}_modelarray.h5"
        if h5.exists() and not self.args.overwrite:
            log.info("Using %s (converted earlier)", h5)
        else:
            scalars = self.find(roots)
            if response not in scalars:
                raise UsageError(
                    f"the model's response {response!r} is not a scalar "
                    f"(scalars: {', '.join(scalars)})"
                )
            self.group({response: scalars[response]}, summary=False)
        cohort = h5.with_name(h5.name.replace("_modelarray.h5", "_cohort.csv"))
        columns = fit_lm(
            h5, cohort, self.args.model, self.args.analysis_name, overwrite=self.args.overwrite
        )
        self.args.scalar = [response]
        code = self.export({"model_text": _model_text(self.args.model)})
        self._model_summary(h5, columns)
        return code

    def _model_summary(self, h5_path: Path, columns: list[str]) -> None:
        import h5py

        with h5py.File(h5_path, "r") as h5:
            table = h5[f"results/{self.args.analysis_name}/results_matrix"][()]
        fitted = int(np.isfinite(table[1]).sum())
        lines = [f"\nModel {self.args.model}: fitted at {fitted:,} of {table.shape[1]:,} elements"]
        if fitted < table.shape[1]:
            lines[0] += " (the others have too few participants with finite values)"
        for i, name in enumerate(columns):
            if name.endswith(".p.value.fdr"):
                significant = int((table[i] < 0.05).sum())
                term = name.removesuffix(".p.value.fdr")
                lines.append(f"  {term}: {significant:,} elements with FDR-corrected p < 0.05")
        print("\n".join(lines))

    # ---- group --analysis-name -------------------------------------------------------------
    def export(self, about: dict | None = None) -> int:
        import h5py

        group_dir = self.output_dir / "group"
        h5_files = sorted(group_dir.glob("desc-*_modelarray.h5"))
        if not h5_files:
            raise MissingInputError(f"{group_dir}: no *_modelarray.h5; run the group level first")
        done = []
        for h5_path in h5_files:
            meta = json.loads(h5_path.with_suffix(".json").read_text())
            if self.args.scalar and meta["Scalar"] not in self.args.scalar:
                continue
            with h5py.File(h5_path, "r") as h5:
                if self.args.analysis_name not in h5.get("results", {}):
                    continue
            done += derivatives.write_statmaps(h5_path, meta, self.args.analysis_name)
        if not done:
            raise DataError(
                f"{group_dir}: no HDF5 holds results/{self.args.analysis_name} "
                "(run ModelArray and writeResults first)"
            )
        facts = self.output_dir / "logs" / "citation-facts.json"
        if facts.is_file():  # the group run's methods text, now with the analysis
            derivatives.write_citation(
                facts.parent,
                json.loads(facts.read_text()),
                {
                    "model_text": "",
                    **(about or {}),
                    "analysis": self.args.analysis_name,
                    "n_maps": len(done),
                },
            )
        print(f"Exported {len(done)} statistical maps to {group_dir}")
        return 0


def _model_text(formula: str) -> str:
    return (
        f"At every element, the linear model `{formula}` was fitted by ordinary least squares "
        "with GreyArray, following ModelArray.lm's rules [@modelarray]: an element was fitted "
        "only when more than max(10, 0.2 N) of the N participants had a finite value, "
        "participants with a missing phenotype were left out, and p-values were corrected "
        "for the false discovery rate over elements [@bh1995].\n"
    )


def _nonfinite_text(counts: list[int]) -> str:
    bad = [c for c in counts if c]
    if not bad:
        return " (none were found)"
    return (
        f" ({len(bad)} of {len(counts)} maps held {sum(bad):,} non-finite values, which "
        "ModelArray treats as missing participants for those elements)"
    )


def _prefixed(label: str) -> str:
    return label if label.startswith("sub-") else f"sub-{label}"


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _kind(path: Path) -> str:
    return next(ext[1:-4] for ext in cifti.EXTENSIONS.values() if path.name.endswith(ext))


def _find_participants(bids_dir: Path) -> Path | None:
    for folder in (
        bids_dir,
        bids_dir.parent.parent if bids_dir.parent.name == "derivatives" else None,
    ):
        if folder is not None and (folder / "participants.tsv").is_file():
            return folder / "participants.tsv"
    return None


def _named_paths(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        out[name] = Path(path).resolve()
    return out


def _load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise MissingInputError(f"{path}: config file not found")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    unknown = set(config) - {"scalars", "patterns"}
    if unknown:
        raise UsageError(f"{path}: unknown keys {sorted(unknown)} (known: scalars, patterns)")
    return config


def _load_json(path: Path | None) -> dict:
    if path is None:
        return {}
    if not path.is_file():
        raise MissingInputError(f"{path}: BIDS filter file not found")
    try:
        filters = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise UsageError(f'{path}: expected {{"<scalar>": {{"<entity>": value, ...}}, ...}}')
    return filters


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))

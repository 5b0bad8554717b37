"""One run of the BIDS-App: its resolved options, what it finds, and its output folder.

Everything that can be checked without writing is checked before the output folder is touched
(paths, configuration files, labels, discovery, the files themselves): a run that fails its
checks leaves no skeleton behind. Log messages are buffered until the output is opened, so the
run's log file still holds them.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from greyarray import __version__
from greyarray.bids import derivatives, discover
from greyarray.errors import DataError, GreyArrayError, MissingInputError, UsageError
from greyarray.io.fileio import make_folder, remove_stale_temporaries
from greyarray.io.names import check_name

log = logging.getLogger("greyarray")
MANIFEST = "sub-{0}/sub-{0}_greyarray.json"


@dataclass
class Run:
    """The resolved options of one run (``from_args`` checks them all)."""

    args: argparse.Namespace
    command_line: str
    bids_dir: Path
    output_dir: Path
    roots: list[Path]
    queries: dict
    patterns: dict
    subjects: list[str] | None
    sessions: list[str] | None
    derivatives: dict[str, Path]
    database_dir: Path | None
    started: float = field(default_factory=time.monotonic)
    stamp: str = field(default_factory=lambda: _stamp())
    log_file: Path | None = None
    reference_levels: dict[str, str] = field(default_factory=dict)
    ordered_factors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace, command_line: str) -> Run:
        bids_dir, output_dir = args.bids_dir.resolve(), args.output_dir.resolve()
        if output_dir == bids_dir:
            raise UsageError("OUTPUT_DIR must not be BIDS_DIR: outputs would mix with inputs")
        _refuse_inside(args.work_dir, bids_dir, "the work folder")
        _refuse_inside(args.bids_database_dir, bids_dir, "the pybids database folder")
        if output_dir.exists() and not output_dir.is_dir():
            raise UsageError(f"{args.output_dir}: OUTPUT_DIR exists and is not a folder")
        if args.analysis_name is not None:
            check_name("analysis", args.analysis_name)
        if args.participants_file and not args.participants_file.is_file():
            raise MissingInputError(f"{args.participants_file}: participants file not found")
        config = _load_yaml(args.config) if args.config else {}
        queries = {**config.get("scalars", {}), **_load_json(args.bids_filter_file)}
        for name in queries:
            check_name("scalar", name, str(args.bids_filter_file or args.config))
        patterns = config.get("patterns", {})
        derivs = _named_paths(args.derivatives)
        roots = discover.dataset_roots(bids_dir, derivs, bool(patterns))
        _refuse_input_as_output(args.output_dir, output_dir, roots, derivs)
        work = args.work_dir.resolve() / "bids_db" if args.work_dir else None
        return cls(
            args=args,
            command_line=command_line,
            bids_dir=bids_dir,
            output_dir=output_dir,
            # derivatives/greyarray, an earlier run's output, is not an input
            roots=[root for root in roots if root != output_dir] or [bids_dir],
            queries=queries,
            patterns=patterns,
            subjects=discover.participant_labels(args.participant_label),
            sessions=sorted({discover.strip(s, "ses-") for s in args.session_label or []}) or None,
            derivatives=derivs,
            database_dir=args.bids_database_dir or work,
        )

    @property
    def logs(self) -> Path:
        return self.output_dir / "logs"

    @property
    def group_dir(self) -> Path:
        return self.output_dir / "group"

    def selection(self) -> dict:
        return {"queries": self.queries, "patterns": self.patterns, "sessions": self.sessions}

    # ---- discovery -------------------------------------------------------------------------
    def find(self, level: str) -> discover.Naming:
        """The selected maps, grouped and named (names stable across runs, see discover)."""
        found = self._from_manifests() if level == "group" else None
        if found is None:
            found = self._discover()
        self._check_selection(found)
        wanted = self.args.scalar or []
        naming = discover.name_scalars(
            found, discover.coverage(self.roots), self.known_names(), wanted
        )
        for name, files in naming.skipped.items():
            subjects = sorted({f"sub-{f.subject}" for f in files})
            log.warning(
                "Skipped scalar %s: a rare variant (%d participant(s): %s), e.g. %s; ask for it "
                "with --scalar %s",
                name,
                len(subjects),
                ", ".join(subjects[:5]),
                files[0].relative,
                name,
            )
        if wanted:
            unknown = sorted(set(wanted) - set(naming.scalars))
            if unknown:
                raise discover.NoFilesError(
                    f"no scalar {', '.join(map(repr, unknown))} "
                    f"(found: {', '.join(naming.scalars)})"
                )
            naming = discover.Naming({n: naming.scalars[n] for n in wanted}, naming.skipped)
        for name, files in naming.scalars.items():
            log.info("Scalar %s: %d files, e.g. %s", name, len(files), files[0].relative)
        return naming

    def _discover(self) -> list[discover.Found]:
        """Index the inputs; gzipped CIFTI names are reported (never read): an error when
        nothing else was found, a warning naming them otherwise."""
        found: list[discover.Found] = []
        gzipped: list[Path] = []
        for root in self.roots:
            log.info("Indexing %s", root)
            found += discover.discover(
                [root],
                self.subjects,
                self.sessions,
                self.queries or None,
                self.patterns,
                self.database_dir,
                gzipped,
            )
        if not gzipped:
            return found
        gzipped = sorted(set(gzipped))
        what = (
            f"{len(gzipped)} gzipped CIFTI file(s) (.nii.gz), e.g. {gzipped[0]}: gzipped NIfTI "
            "is not CIFTI-2, whose files are never compressed (gunzip them to use them)"
        )
        if not found:
            raise DataError(f"found only {what}")
        subjects = sorted({discover.subject_of(path) for path in gzipped})
        log.warning("Left out %s; participant(s): %s", what, ", ".join(subjects))
        return found

    def known_names(self) -> dict[str, tuple]:
        """Names earlier runs gave to kinds of maps: the participant manifests' of OUTPUT_DIR
        (every job's, so that a later job names maps as earlier ones did), then the group
        outputs'. R scripts use these names: they must not change. A name recorded for two
        kinds of maps (manifests of older versions, edited files) is reported by name."""
        recorded: dict[str, dict[tuple, list[str]]] = {}
        for path in sorted(self.output_dir.glob(MANIFEST.format("*"))):
            for name, key in _recorded_names(path):
                recorded.setdefault(name, {}).setdefault(key, []).append(path.parent.name)
        known = {}
        for name, keys in recorded.items():
            ranked = sorted(keys.items(), key=lambda pair: -len(pair[1]))
            known[name] = ranked[0][0]
            for key, subjects in ranked[1:]:
                _warn_two_meanings(name, known[name], key, f"manifests of {_list(subjects)}")
        for sidecar in sorted(self.group_dir.glob("desc-*_modelarray.json")):
            try:
                meta = json.loads(sidecar.read_text())
                name, key = meta["Scalar"], tuple(tuple(pair) for pair in meta["Key"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # written by GreyArray 0.1.0 (no key) or damaged: not binding
            if name in known and known[name] != key:
                _warn_two_meanings(name, key, known[name], "participant manifests")
            known[name] = key
        return known

    def _from_manifests(self) -> list[discover.Found] | None:
        """The participant level's findings, if every subject folder of the inputs has a
        manifest made from these inputs with the same selection; None means: discover again.

        Manifests made from another BIDS_DIR (compared as resolved paths) are not used: the
        group level converts the BIDS_DIR it is given (a copy, or the same data under another
        mount point in a container), with a warning naming both folders. Manifests made with
        --scalar cover only those scalars: a group run asking for others (or for all) discovers
        again, so that its result does not depend on the participant level's filter."""
        subjects = self.subjects or sorted(
            {p.name[4:] for root in self.roots for p in root.glob("sub-*") if p.is_dir()}
        )
        paths = [self.output_dir / MANIFEST.format(s) for s in subjects]
        if not paths or not all(p.is_file() for p in paths):
            return None
        found = []
        for path in paths:
            try:  # a damaged or edited manifest (any shape) only costs a new discovery
                manifest = json.loads(path.read_text())
                if not self._usable(path, manifest):
                    return None
                items = [
                    discover.Found(
                        Path(entry["dataset"]) / entry["path"],
                        Path(entry["dataset"]),
                        manifest["participant_id"][4:],
                        entry["session"],
                        dict(entry["entities"]),
                        entry["query"],
                    )
                    for entry in manifest["files"] + manifest.get("skipped", [])
                ]
            except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
                log.info("%s cannot be read: discovering again", path)
                return None
            for item in items:
                if not item.path.is_file():
                    log.info("%s is gone: discovering again", item.path)
                    return None
                found.append(item)
        log.info("Using the manifests of %d participants (participant level)", len(paths))
        return found

    def _usable(self, path: Path, manifest: dict) -> bool:
        """Whether a manifest describes what this group run would find (see _from_manifests)."""
        if manifest.get("selection") != self.selection():
            log.info("%s was made with other filters: discovering again", path)
            return False
        datasets = {Path(e["dataset"]) for e in manifest["files"] + manifest.get("skipped", [])}
        if not datasets <= set(self.roots):
            made_from = manifest.get("bids_dir") or ", ".join(sorted(map(str, datasets)))
            log.warning(
                "The manifests in %s were made from %s, not from BIDS_DIR %s: discovering in "
                "%s (the participant reports describe the other folder's files)",
                self.output_dir,
                made_from,
                self.bids_dir,
                self.bids_dir,
            )
            return False
        if "scalar_filter" not in manifest:  # GreyArray < 0.2: filter not recorded
            log.info("%s does not record its --scalar filter: discovering again", path)
            return False
        limited, wanted = manifest["scalar_filter"], self.args.scalar
        if limited and not (wanted and set(wanted) <= set(limited)):
            log.info("%s covers only --scalar %s: discovering again", path, " ".join(limited))
            return False
        return True

    def _check_selection(self, found: list[discover.Found]) -> None:
        """Every selected participant and session has maps; all missing ones are named."""
        where = ", ".join(map(str, self.roots))
        subjects = {item.subject for item in found}
        missing = [s for s in self.subjects or [] if s not in subjects]
        if missing and self.sessions:
            raise discover.NoFilesError(
                f"{_few('participant', missing)} no maps in session(s) "
                f"{', '.join(self.sessions)} in {where}"
            )
        if missing:
            raise discover.NoFilesError(
                f"{_few('participant', missing, 'was')} not found in {where}"
            )
        sessions = {item.session for item in found}
        missing = [s for s in self.sessions or [] if s not in sessions]
        if missing:
            raise discover.NoFilesError(f"{_few('session', missing, 'was')} not found in {where}")
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

    # ---- output ----------------------------------------------------------------------------
    def open_output(self, mode: str, extra: dict | None = None) -> None:
        """Create OUTPUT_DIR as a derivatives dataset, start the log file (with what was logged
        so far), remove what killed runs left, and record the configuration."""
        derivatives.init_dataset(self.output_dir, [self.bids_dir])
        make_folder(self.logs)
        for folder in (self.output_dir, self.logs, self.group_dir):
            for stale in remove_stale_temporaries(folder):
                log.info("Removed %s, left by a process that no longer runs", stale)
        self._start_log(mode, extra)

    def _start_log(self, mode: str, extra: dict | None = None) -> None:
        """The run's log file (with what was logged so far) and its configuration in logs/."""
        self.log_file = start_run_log(
            self.logs,
            f"{self.args.analysis_level}-{self.stamp}-{os.getpid()}",
            {**self.config(mode), **(extra or {})},
        )

    def record_refusal(self) -> None:
        """A run refused after its checks (e.g. results exist) leaves its log and configuration
        in OUTPUT_DIR/logs when the folder qualifies (``refusal_logs``); the caller logs the
        error line and exit code there."""
        if self.log_file is None and refusal_logs(self.output_dir) is not None:
            self._start_log("refused")

    def config(self, mode: str) -> dict:
        args = {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(self.args).items()
            if k not in ("bids_dir", "output_dir")
        }
        return {
            "command_line": self.command_line,
            "greyarray_version": __version__,
            "level": self.args.analysis_level,
            "mode": mode,
            "bids_dir": str(self.bids_dir),
            "output_dir": str(self.output_dir),
            "datasets": [str(r) for r in self.roots],
            "participant_label": self.subjects,
            "session_label": self.sessions,
            "queries": self.queries,
            "patterns": self.patterns,
            "options": args,
        }

    def finish(self, lines: list[str]) -> int:
        """Print the run's summary and record it, with the time taken, in the log."""
        text = "\n".join(lines)
        print(text)
        log.debug("Summary:\n%s", text)
        for line in lines:
            if line.strip():
                _to_file(logging.INFO, line)
        _to_file(logging.INFO, f"Done in {time.monotonic() - self.started:.1f} s (exit code 0)")
        return 0


def refusal_logs(output_dir: Path | None) -> Path | None:
    """Where a refused run is put on record: OUTPUT_DIR/logs when OUTPUT_DIR exists and is
    GreyArray's (its dataset_description.json says so) or holds nothing but logs/ (a folder
    made for the outputs, as a container's mount point is, where earlier runs were refused).
    Never a folder that does not exist (no skeleton) nor someone else's (an input dataset
    given by mistake)."""
    if output_dir is None:
        return None
    folder = Path(output_dir).resolve()
    try:
        if not folder.is_dir():
            return None
        empty = {entry.name for entry in folder.iterdir()} <= {"logs"}
    except OSError:
        return None
    if not empty:
        try:
            about = json.loads((folder / "dataset_description.json").read_text())
            if not any(g.get("Name") == "greyarray" for g in about["GeneratedBy"]):
                return None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None
    return folder / "logs"


def record_refusal(
    output_dir: Path | None, command_line: str, error: str = "", code: int = 0
) -> Path | None:
    """A run refused before its settings were resolved (its arguments, its level, a missing
    --participants-file...): its command line in OUTPUT_DIR/logs (see ``refusal_logs``), with
    ``error`` and ``code`` when no later handler logs them (argparse's usage errors)."""
    logs = refusal_logs(output_dir)
    if logs is None:
        return None
    try:
        path = start_run_log(
            logs,
            f"refused-{_stamp()}-{os.getpid()}",
            {"command_line": command_line, "greyarray_version": __version__, "mode": "refused"},
        )
    except (OSError, GreyArrayError):  # a folder we cannot write: the error line is enough
        return None
    _to_file(logging.INFO, command_line)
    if error:
        _to_file(logging.ERROR, f"{error} (exit code {code})")
    return path


def start_run_log(logs: Path, name: str, config: dict) -> Path:
    """``logs/greyarray-<name>.log`` (with what was logged so far) and the configuration."""
    make_folder(logs)
    path = logs / f"greyarray-{name}.log"
    start_log_file(path)
    derivatives.write_config(logs, f"config-{name}.yaml", config)
    return path


# ---- the log file: messages are buffered until the output folder may be written --------------
_BUFFER = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1)


def _stamp() -> str:
    """Date, time and milliseconds: names a run's log and configuration files (with the PID)."""
    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now * 1000) % 1000:03d}"


def buffer_log(level: int) -> None:
    """Keep messages of ``level`` and above until ``start_log_file``."""
    _BUFFER.setLevel(level)
    _BUFFER.buffer.clear()
    logging.getLogger().addHandler(_BUFFER)


def start_log_file(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setLevel(_BUFFER.level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s"))
    for record in _BUFFER.buffer:
        handler.handle(record)
    _BUFFER.buffer.clear()
    root = logging.getLogger()
    root.removeHandler(_BUFFER)
    root.addHandler(handler)


def _to_file(level: int, message: str) -> None:
    record = logging.LogRecord("greyarray", level, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _recorded_names(path: Path) -> list[tuple[str, tuple]]:
    """(name, entity key) of the maps a manifest named after their entities (not those of a
    query or pattern); an unreadable manifest records nothing."""
    try:
        manifest = json.loads(path.read_text())
        return [
            (e["scalar"], discover.key_of(e["entities"]))
            for e in manifest["files"]
            if e["query"] is None
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _warn_two_meanings(name: str, kept: tuple, other: tuple, where: str) -> None:
    """A scalar name recorded for two kinds of maps: say which meaning is kept."""
    log.warning(
        "Scalar %s names two kinds of maps in OUTPUT_DIR: %s, but %s in the %s; it keeps "
        "naming the first (run the participant level again for those participants)",
        name,
        _entities(kept),
        _entities(other),
        where,
    )


def _entities(key: tuple) -> str:
    return "_".join(f"{k}-{v}" for k, v in key if k not in ("extension", "suffix")) or str(key)


def _list(labels: list[str], shown: int = 5) -> str:
    more = f" and {len(labels) - shown} more" if len(labels) > shown else ""
    return ", ".join(labels[:shown]) + more


def _few(noun: str, labels: list[str], verb: str = "has", shown: int = 5) -> str:
    """``participant 98 has`` / ``3 participants have: 97, 98, 99`` (the first few, then how
    many more): every missing label is counted, a long list is not printed whole."""
    plural = {"has": "have", "was": "were"}[verb]
    if len(labels) == 1:
        return f"{noun} {labels[0]} {verb}"
    return f"{len(labels)} {noun}s ({_list(labels, shown)}) {plural}"


def _refuse_inside(path: Path | None, bids_dir: Path, what: str) -> None:
    """Folders GreyArray writes must not be inside BIDS_DIR: they would become inputs."""
    if path is not None and path.resolve().is_relative_to(bids_dir):
        raise UsageError(f"{path}: {what} must not be inside BIDS_DIR")


def _refuse_input_as_output(
    given: Path, output_dir: Path, roots: list[Path], derivs: dict[str, Path]
) -> None:
    """OUTPUT_DIR may be a dataset of the inputs only if GreyArray made it (derivatives/
    greyarray of an earlier run, then left out of the inputs); another one is an input."""
    if output_dir not in roots and output_dir not in derivs.values():
        return
    generated = discover.load_description(output_dir).get("GeneratedBy") or [{}]
    first = generated[0] if isinstance(generated, list) and generated else {}
    own = isinstance(first, dict) and str(first.get("Name", "")).lower() == "greyarray"
    if output_dir in derivs.values() or not own:
        raise UsageError(
            f"{given}: OUTPUT_DIR must not be an input dataset (derivatives of BIDS_DIR): "
            "outputs would mix with inputs"
        )


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
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a mapping with keys scalars and/or patterns")
    unknown = set(config) - {"scalars", "patterns"}
    if unknown:
        raise UsageError(f"{path}: unknown keys {sorted(unknown)} (known: scalars, patterns)")
    for key in ("scalars", "patterns"):
        if not isinstance(config.get(key, {}), dict):
            raise UsageError(f"{path}: {key} must be a mapping of names")
    return config


def _load_json(path: Path | None) -> dict:
    if path is None:
        return {}
    if not path.is_file():
        raise MissingInputError(f"{path}: BIDS filter file not found")
    try:
        filters = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise UsageError(f'{path}: expected {{"<scalar>": {{"<entity>": value, ...}}, ...}}')
    return filters

"""Check what the BIDS-App wrote inside a container; report in the plain 'N passed, N failed' form.

check_outputs.py OUT TYPE N_SUBJECTS     checks of one container run (TYPE: docker|apptainer)
check_outputs.py --lint-def apptainer.def
check_outputs.py --total < reports       sums the reports, exits 1 if anything failed
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

KNOWN_SECTIONS = {
    "setup",
    "files",
    "post",
    "environment",
    "runscript",
    "startscript",
    "test",
    "labels",
    "help",
    "arguments",
}


class Report:
    def __init__(self, label: str):
        self.label, self.passed, self.failed = label, 0, 0

    def check(self, what: str, test) -> None:
        try:
            ok, detail = bool(test()), ""
        except Exception as err:  # a check that crashes is a failed check
            ok, detail = False, f" ({type(err).__name__}: {err})"
        self.passed += ok
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}: {self.label}: {what}{detail}")

    def summary(self) -> int:
        print(f"{self.passed} passed, {self.failed} failed")
        return int(self.failed > 0)


def outputs(out: Path, kind: str, n: int) -> int:
    import h5py
    import pandas as pd

    report = Report(kind)
    info = lambda: json.loads((out / "dataset_description.json").read_text())  # noqa: E731
    report.check(
        "dataset_description.json is a derivative by greyarray",
        lambda: (
            info()["DatasetType"] == "derivative"
            and info()["GeneratedBy"][0]["Name"] == "greyarray"
        ),
    )
    report.check(
        f"GeneratedBy.Container.Type is {kind}",
        lambda: info()["GeneratedBy"][0]["Container"]["Type"] == kind,
    )
    report.check(
        f"{n} participant manifests", lambda: len(list(out.glob("sub-*/*_greyarray.json"))) == n
    )
    h5_path = out / "group" / "desc-thickness_modelarray.h5"
    cohort = out / "group" / "desc-thickness_cohort.csv"

    def layout() -> bool:
        with h5py.File(h5_path, "r") as h5:
            values = h5["scalars/thickness/values"]
            names = list(h5["scalars/thickness/column_names"].asstr()[()])
            return (
                values.shape == (n, 91282)
                and values.dtype == "float32"
                and values.chunks[0] == n
                and values.chunks[0] * values.chunks[1] * 4 <= 2**20
                and names == list(pd.read_csv(cohort)["source_file"])
                and h5["greyordinates"].shape == (2, 91282)
            )

    report.check("HDF5 layout: scalars/thickness/values, column_names = cohort source_file", layout)
    report.check(
        f"cohort CSV: {n} rows with participant_id, age, sex",
        lambda: (
            (len(table := pd.read_csv(cohort)) == n)
            and {"participant_id", "age", "sex"} <= set(table.columns)
        ),
    )
    report.check(
        "ALFF scalars converted too",
        lambda: (
            {p.name for p in (out / "group").glob("*_modelarray.h5")}
            >= {"desc-alff_modelarray.h5", "desc-alffDescSmooth_modelarray.h5"}
        ),
    )
    report.check(
        f"HTML reports: group.html and {n} sub-*.html, figures embedded",
        lambda: (
            len(list(out.glob("sub-*.html"))) == n
            and (out / "group.html").stat().st_size > 100_000
            and "data:image/png;base64," in (out / "group.html").read_text()
        ),
    )
    report.check(
        "logs/CITATION.md and CITATION.bib",
        lambda: (
            (out / "logs" / "CITATION.md").stat().st_size > 500
            and (out / "logs" / "CITATION.bib").exists()
        ),
    )
    owner = "the -u user (1234)" if kind == "docker" else "the user who ran apptainer (1234)"
    report.check(
        f"outputs owned by {owner}, not root",
        lambda: all(p.stat().st_uid == 1234 for p in out.rglob("*") if p.name != "labels.txt"),
    )
    if kind == "apptainer":
        pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
        version = re.search(r'version = "([^"]+)"', pyproject)[1]
        report.check(
            f"image label version {version} (read from pyproject.toml)",
            lambda: version in (out / "labels.txt").read_text(),
        )
    return report.summary()


def stopped(out: Path, code: str, seconds: str, last_line: Path) -> int:
    """`docker stop` during a group run: SIGTERM handled, temporaries removed, within seconds."""
    report = Report("docker stop")
    report.check(f"exit code 143 (SIGTERM), got {code}", lambda: code == "143")
    report.check(f"stopped within 10 s ({seconds} s)", lambda: float(seconds) < 10)
    report.check(
        "one line saying the run was interrupted",
        lambda: "interrupted by SIGTERM" in last_line.read_text(),
    )
    report.check(
        "no temporary files left",
        lambda: not [p for p in out.rglob("*") if "greyarray-tmp" in p.name],
    )
    return report.summary()


def lint_def(path: Path) -> int:
    report = Report(path.name)
    text = path.read_text()
    sections = re.findall(r"^%(\w+)", text, re.MULTILINE)
    report.check("only known sections", lambda: set(sections) <= KNOWN_SECTIONS)
    report.check(
        "Bootstrap: docker From: debian:bookworm-slim",
        lambda: (
            re.search(r"^Bootstrap:\s*docker\s*$", text, re.M)
            and re.search(r"^From:\s*debian:bookworm-slim\s*$", text, re.M)
        ),
    )
    report.check('%runscript: exec greyarray "$@"', lambda: 'exec greyarray "$@"' in text)
    report.check(
        "%test, %help and %labels present", lambda: {"test", "help", "labels"} <= set(sections)
    )
    report.check(
        "%test and %post run under set -eu (a failing check fails the build)",
        lambda: all(
            re.search(rf"^%{s}\n(\s*#.*\n)*\s+set -eu", text, re.M) for s in ("test", "post")
        ),
    )
    return report.summary()


def total() -> int:
    passed = failed = 0
    for line in sys.stdin:
        if match := re.fullmatch(r"(\d+) passed, (\d+) failed\s*", line):
            passed, failed = passed + int(match[1]), failed + int(match[2])
    print(f"container checks: {passed} passed, {failed} failed")
    return int(failed > 0 or passed == 0)


if __name__ == "__main__":
    if sys.argv[1] == "--lint-def":
        sys.exit(lint_def(Path(sys.argv[2])))
    if sys.argv[1] == "--total":
        sys.exit(total())
    if sys.argv[1] == "--stopped":
        sys.exit(stopped(Path(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5])))
    sys.exit(outputs(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))

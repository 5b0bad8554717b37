"""The cohort CSV is read as R's read.csv reads it (ModelArray's users read it so): na.strings is
"NA" only, so "", None, n/a, null, NaN and N/A in a text column are levels, not missing rows;
blank fields are NA in numeric and logical columns; logicals are T/F/TRUE/FALSE only; numbers
as R's type.convert reads them. Checked against R itself, value by value, and through a fit."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
from conftest import r_environment, require, run_greyarray
from test_lm import make_h5, read_results

from greyarray.io.cohort import read_csv_table

# one column per case; the first row of cells, then the second...
CELLS = {
    "text": ["x", "", "None", "n/a", "null", "NaN", "N/A", "NA", "nan", " "],
    "numbers": ["1", "NA", "", " 2", "3 ", "1e3", "0x1A", "-Inf", "NaN", "1.5e"],
    "logical": ["T", "FALSE", "NA", "", "TRUE", "F", "T", "T", "F", "  "],
    "lower": ["true", "false", "true", "true", "false", "true", "false", "true", "true", "true"],
    "nan": ["NaN", "nan", "Nan", "inf", "infinity", "+NaN", "-inf", "0x1p3", "0x1.8", "1e+"],
    "odd": ["NAN", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
    "empty": [""] * 10,
    "ints": [str(i) for i in range(10)],
}

R_READ = r"""
d <- read.csv(commandArgs(TRUE)[1])
out <- lapply(d, function(x) list(class = class(x)[1], na = is.na(x) & !is.nan(x),
  value = if (is.numeric(x)) sprintf("%.17g", x) else as.character(x)))
writeLines(jsonlite::toJSON(out, na = "null", auto_unbox = TRUE), commandArgs(TRUE)[2])
"""


def write_cells(path) -> None:
    rows = zip(*CELLS.values(), strict=True)
    quoted = [",".join(f'"{v}"' if v.strip() != v or v == "" else v for v in row) for row in rows]
    path.write_text(",".join(CELLS) + "\n" + "\n".join(quoted) + "\n")


def test_columns_typed_as_read_csv(tmp_path):
    rscript = require("Rscript")
    csv = tmp_path / "cells.csv"
    write_cells(csv)
    script = tmp_path / "read.R"
    script.write_text(R_READ)
    subprocess.run(
        [rscript, script, csv, tmp_path / "r.json"], check=True, env=r_environment(), timeout=60
    )
    theirs = json.loads((tmp_path / "r.json").read_text())
    ours = read_csv_table(csv, "cohort file")
    kinds = {"logical": "bool", "character": "str", "integer": "number", "numeric": "number"}
    for column, r in theirs.items():
        values = ours[column].tolist()
        na = [v is None or (isinstance(v, float) and np.isnan(v)) for v in values]
        if r["class"] == "numeric" or r["class"] == "integer":
            assert pd.api.types.is_numeric_dtype(ours[column]), column
            got = ours[column].to_numpy(float)
            want = np.array([np.nan if v == "NA" else float(v) for v in r["value"]])
            assert np.array_equal(got, want, equal_nan=True), column
            continue
        assert na == [bool(v) for v in r["na"]], column
        present = [v for v, missing in zip(values, na, strict=True) if not missing]
        assert {type(v).__name__ for v in present} <= {kinds[r["class"]]}, column
        if r["class"] == "character":
            assert present == [v for v in r["value"] if v is not None], column
        else:
            assert present == [v == "TRUE" for v in r["value"] if v is not None], column


def test_text_cells_are_levels_in_a_fit(tmp_path):
    """A text column with "", None, n/a, null, NaN and N/A: every row is kept, each is a level,
    and fit-lm gives R's lm on read.csv's table (rows were dropped before)."""
    rscript = require("Rscript")
    rng = np.random.default_rng(3)
    n = 40
    group = np.array(["a", "", "None", "n/a", "null", "NaN", "N/A", "b"] * 5)
    phenotypes = pd.DataFrame(
        {"source_file": [f"f{i}.nii" for i in range(n)], "age": rng.uniform(8, 20, n).round(2)}
    )
    values = rng.normal(size=(n, 3))
    h5 = make_h5(tmp_path, phenotypes, values)
    cohort = pd.read_csv(tmp_path / "cohort.csv", dtype=str, keep_default_na=False)
    cohort["group"] = group
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    done = run_greyarray(
        "fit-lm", "--input-hdf5", h5, "--cohort-file", tmp_path / "cohort.csv",
        "--formula", "y ~ age + group", "--var-terms", "estimate",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ours = read_results(h5)
    np.savetxt(tmp_path / "y.csv", values.astype(np.float32).astype(float), delimiter=",")
    script = tmp_path / "lm.R"
    script.write_text(
        'd <- read.csv("cohort.csv"); y <- as.matrix(read.csv("y.csv", header = FALSE))\n'
        "out <- sapply(1:3, function(j) { d$y <- y[, j]; coef(lm(y ~ age + group, d)) })\n"
        'write.csv(t(out), "r.csv", row.names = FALSE)\n'
    )
    subprocess.run([rscript, script], cwd=tmp_path, check=True, env=r_environment(), timeout=60)
    theirs = pd.read_csv(tmp_path / "r.csv")
    assert len(theirs.columns) == 9  # intercept, age and 7 contrasts: no row, no level lost
    for column in theirs:
        name = "Intercept" if column == "(Intercept)" else column
        assert np.allclose(ours[f"{name}.estimate"], theirs[column], rtol=1e-10), column

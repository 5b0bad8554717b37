#!/bin/sh
# Regenerates tests/data/gam/expected_*.csv with R's mgcv (tests/r/gam_reference.R).
set -e
here=$(dirname "$0")
data="$here/../data/gam"
run() {  # name formula method full changed
  Rscript "$here/gam_reference.R" "$data/phenotypes.csv" "$data/values.csv" "$2" "$3" "$4" "$5" \
    "$data/expected_$1.csv"
}
run fx_reml 'y ~ s(age, k = 4, fx = TRUE) + sex' REML 1 0
run tp_reml_rsq 'y ~ s(age) + sex' REML 0 1
run tp_reml_full 'y ~ s(age) + sex' REML 1 0
run cr_gcv 'y ~ s(age, bs = "cr") + s(x2)' GCV.Cp 1 0
run shrink_reml 'y ~ s(age, bs = "ts") + s(x2, k = 6) + sex' REML 1 0

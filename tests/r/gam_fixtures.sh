#!/bin/sh
# Regenerates tests/data/gam/expected_*.csv with R's mgcv (tests/r/gam_reference.R).
set -e
here=$(dirname "$0")
data="$here/../data/gam"
run() {  # name formula method full changed [ordered]
  Rscript "$here/gam_reference.R" "$data/phenotypes.csv" "$data/values.csv" "$2" "$3" "$4" "$5" \
    "$data/expected_$1.csv" $6
}
run fx_reml 'y ~ s(age, k = 4, fx = TRUE) + sex' REML 1 0
run tp_reml_rsq 'y ~ s(age) + sex' REML 0 1
run tp_reml_full 'y ~ s(age) + sex' REML 1 0
run cr_gcv 'y ~ s(age, bs = "cr") + s(x2)' GCV.Cp 1 0
run shrink_reml 'y ~ s(age, bs = "ts") + s(x2, k = 6) + sex' REML 1 0
# ModelArray's gen_gamFormula_fxSmooth (osex: sex as an ordered factor, F first) and
# gen_gamFormula_contIx (k = 4) formulas, with the changed R-squared of the interaction
run fxsmooth_reml 'y ~ osex + s(age, k = 4, fx = TRUE) + s(age, k = 4, by = osex, fx = TRUE)' \
  REML 1 3 osex=F
run contix_gcv 'y ~ ti(age, k = 4, fx = TRUE) + ti(x2, k = 4, fx = TRUE) + ti(age, x2, k = 4, fx = TRUE)' \
  GCV.Cp 1 3
run ti_reml 'y ~ ti(age) + ti(x2) + ti(age, x2)' REML 1 0
run te_reml 'y ~ te(age, x2) + sex' REML 1 0
run te_gcv 'y ~ te(age, x2, k = c(4, 6), bs = c("tp", "cr"))' GCV.Cp 1 0
run by_reml 'y ~ osex + s(age) + s(age, by = osex)' REML 1 3 osex=F
run by_gcv 'y ~ sex + s(age, by = sex, bs = "cr")' GCV.Cp 1 2

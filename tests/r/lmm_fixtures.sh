#!/bin/sh
# Regenerates tests/data/lmm/expected_*.csv with lme4 + lmerTest (tests/r/lmm_reference.R):
# each model with lmer's defaults (default_*) and with tight optimizer tolerances (tight_*).
# The data come from tests/r/lmm_data.py and tests/r/lmm_saddle.py (seeded).
set -e
here=$(dirname "$0")
data="$here/../data/lmm"
run() {  # name formula reml
  for mode in default tight; do
    Rscript "$here/lmm_reference.R" "$data/phenotypes.csv" "$data/values.csv" "$2" "$3" \
      "$data/${mode}_$1.csv" "$mode"
  done
}
run intercept 'y ~ age + sex + (1 | participant_id)' TRUE
run intercept_ml 'y ~ age + sex + (1 | participant_id)' FALSE
run slope 'y ~ age + sex + (1 + age | participant_id)' TRUE
run uncorrelated 'y ~ age + sex + (1 | participant_id) + (0 + age | participant_id)' TRUE
run crossed 'y ~ age + sex + (1 | site) + (1 | participant_id)' TRUE
run nested_ml 'y ~ age + sex + (1 | family_id/participant_id)' FALSE
# tests/r/lmm_saddle.py's responses (a correlated slope whose optimiser can stall at theta = 0)
for mode in default tight; do
  for reml in TRUE FALSE; do
    suffix=$([ "$reml" = TRUE ] || echo _ml)
    Rscript "$here/lmm_reference.R" "$data/phenotypes.csv" "$data/saddle.csv" \
      'y ~ age + sex + (1 + age | participant_id)' "$reml" "$data/${mode}_saddle$suffix.csv" "$mode"
  done
done
# tests/r/lmm_restart.py's response (an ML random slope with a singular local optimum)
for mode in default tight; do
  Rscript "$here/lmm_reference.R" "$data/restart/phenotypes.csv" "$data/restart/values.csv" \
    'y ~ age + sex + (1 + age | participant_id)' FALSE "$data/${mode}_restart_ml.csv" "$mode"
done

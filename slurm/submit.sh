#!/bin/bash
# Submit GreyArray's pipeline to SLURM: the participant array, then the group job once every
# participant task has succeeded; with --shards K (and --model FORMULA --permutations N) the
# permutations as an array of K shards after the group job, then the merge job that writes the
# results and maps. A failed task cancels the jobs after it (--kill-on-invalid-dep=yes).
#
#   slurm/submit.sh BIDS_DIR OUTPUT_DIR SUBJECTS_FILE [--shards K] [options]
#
# [options] go to every job, except the model's (--model, --permutations, --tfce, --seed,
# --exchangeability-blocks, --reference-level, --analysis-name, --gam-method, --changed-rsq-term),
# which go to the group job (without --shards) or to the shards and the merge, and the
# harmonization's (--harmonize, --harmonize-covariates), which go to the group job, the shards and
# the merge (the participant level refuses them; with --shards the group job harmonises before
# the shards permute, so --harmonize needs --harmonize-covariates there). SLURM logs go to
# OUTPUT_DIR/logs/slurm/. The jobs run the image $GREYARRAY_IMAGE (default greyarray.sif) or
# $GREYARRAY_CMD (see participant.sbatch); sbatch's own variables (SBATCH_ACCOUNT,
# SBATCH_PARTITION, ...) apply to every job. Prints the job ids: participant=ID group=ID [shards=ID merge=ID].
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -lt 3 ]; then
  sed -n '2,/^set/p' "$0" | sed -e '/^set/d' -e 's/^# \{0,1\}//' >&2
  echo "greyarray: error: usage: submit.sh BIDS_DIR OUTPUT_DIR SUBJECTS_FILE [--shards K] [options]" >&2
  exit 64
fi
bids=$(realpath "$1") out=$(realpath -m "$2") list=$(realpath "$3")
shift 3
common=() model=() harmonize=() shards=0 target=common named=" "
while [ $# -gt 0 ]; do
  flag=${1%%=*}  # --option=value as --option value
  case $flag in
    --shards)
      if [ "$flag" != "$1" ]; then shards=${1#*=}; shift; else shards=${2:?--shards needs K}; shift 2; fi
      continue ;;
    --model | --permutations | --tfce | --seed | --exchangeability-blocks | --reference-level | \
      --analysis-name | --gam-method | --changed-rsq-term) target=model ;;
    --harmonize | --harmonize-covariates) target=harmonize ;;
    --*) target=common ;;
  esac
  case $1 in --*) named+="$flag " ;; esac
  case $target in
    model) model+=("$1") ;;
    harmonize) harmonize+=("$1") ;;
    *) common+=("$1") ;;
  esac
  shift
done
n=$(grep -c -v '^[[:space:]]*$' "$list" || true)
if [ "$n" = 0 ]; then echo "greyarray: error: $list lists no participant" >&2; exit 66; fi
if [ "$shards" != 0 ] && [[ $named != *" --permutations "* ]]; then
  echo "greyarray: error: --shards needs --model FORMULA --permutations N" >&2; exit 64
fi
if [ "$shards" != 0 ] && [[ $named == *" --harmonize "* && $named != *" --harmonize-covariates "* ]]; then
  echo "greyarray: error: --shards with --harmonize needs --harmonize-covariates TERMS (the group" \
    "job harmonises before the shards, without the model whose terms are the default)" >&2
  exit 64
fi
logs=$out/logs/slurm
mkdir -p "$logs"
submit() { sbatch --parsable "$@" | cut -d';' -f1; }
array="--output=$logs/%x-%A_%a.log" single="--output=$logs/%x-%j.log"
after() { echo --dependency=afterok:"$1" --kill-on-invalid-dep=yes; }

participant=$(submit "$array" --array="1-$n" "$here/participant.sbatch" "$bids" "$out" "$list" "${common[@]}")
common+=("${harmonize[@]}")  # the group level and after: harmonization too
if [ "$shards" = 0 ]; then
  group=$(submit "$single" $(after "$participant") "$here/group.sbatch" "$bids" "$out" "${common[@]}" "${model[@]}")
  echo "participant=$participant group=$group"
  exit 0
fi
group=$(submit "$single" $(after "$participant") "$here/group.sbatch" "$bids" "$out" "${common[@]}")
shard=$(submit "$array" --array="1-$shards" $(after "$group") "$here/permutation-shards.sbatch" "$bids" "$out" \
  "${common[@]}" "${model[@]}")
merge=$(submit "$single" $(after "$shard") "$here/merge.sbatch" "$bids" "$out" "$shards" "${common[@]}" \
  "${model[@]}")
echo "participant=$participant group=$group shards=$shard merge=$merge"

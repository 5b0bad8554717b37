#!/usr/bin/env bash
# Start a one-node SLURM cluster on localhost: munged, slurmctld and slurmd, configured by
# .ci/slurm/slurm.conf; as root (slurmd starts jobs as their users). `.ci/run` calls it before the
# tests; on a developer machine run `sudo .ci/slurm/start.sh` (and `sudo .ci/slurm/start.sh stop`).
# Nothing is started when a slurmctld already answers. The filled-in configuration goes to
# $SLURM_CONF (default /etc/slurm/slurm.conf, never replacing one that start.sh did not write);
# state and logs to $GREYARRAY_SLURM_DIR (default /var/tmp/greyarray-slurm).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
conf=${SLURM_CONF:-/etc/slurm/slurm.conf}
state=${GREYARRAY_SLURM_DIR:-/var/tmp/greyarray-slurm}
marker="# greyarray-ci:"

if [ "${1:-}" = stop ]; then
  scontrol shutdown 2>/dev/null || true
  exit 0
fi
if scontrol ping 2>/dev/null | grep -q 'is UP'; then
  echo "slurm: a slurmctld already answers ($conf)"; exit 0
fi
[ "$(id -u)" = 0 ] || { echo "slurm: start.sh must run as root (slurmd starts jobs as their users)" >&2; exit 77; }
if [ -e "$conf" ] && ! grep -q "^$marker" "$conf"; then
  echo "slurm: $conf exists and is not greyarray-ci's; set SLURM_CONF to another path" >&2; exit 73
fi

# munge: one key (made by the Debian package, else here), munged as the munge user.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  [ -s /etc/munge/munge.key ] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; }
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# slurm.conf with this machine's memory (as slurmd itself measures it).
memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
rm -rf "$state/slurmctld" "$state/slurmd"; mkdir -p "$state/slurmctld" "$state/slurmd" "$(dirname "$conf")"
sed -e "s#@STATE@#$state#g" -e "s#@MEMORY@#$memory#" "$here/slurm.conf" > "$conf"
export SLURM_CONF=$conf
slurmctld -i
slurmd -N localhost
for _ in $(seq 100); do
  [ "$(sinfo -h -n localhost -o %T 2>/dev/null)" = idle ] && { echo "slurm: localhost idle (8 CPUs, $memory MB)"; exit 0; }
  sleep 0.2
done
echo "slurm: the node did not become idle; logs in $state:" >&2
tail -n 20 "$state/slurmctld.log" "$state/slurmd.log" >&2
exit 69

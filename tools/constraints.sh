#!/usr/bin/env bash
# Pin every dependency (and the test tools) at the versions that pass CI: resolves pyproject.toml
# in a fresh virtual environment and writes constraints.txt, which the images, CI and the README's
# install share (pip install -c constraints.txt ...). Run it when a dependency changes.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q '.[test]'
{
  echo "# Versions GreyArray is tested with (tools/constraints.sh writes this file)."
  "$venv/bin/pip" freeze --exclude greyarray | grep -v '^-e '
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"

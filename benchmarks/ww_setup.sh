#!/usr/bin/env bash
# Create (or bring up to date) the WeightWatcher venv used by benchmarks/ww_minilm.py.
#
#   bash benchmarks/ww_setup.sh        # -> benchmarks/.ww-venv
#   WW_VENV=/some/dir bash benchmarks/ww_setup.sh
#
# Safe to rerun: an existing venv is reused and pip leaves satisfied pins alone. torch is
# installed first and pinned to 2.13.0 (the CPU build); weightwatcher itself does not depend
# on torch, and the script fails if anything else was installed in its place.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${WW_VENV:-$here/.ww-venv}"
python="${PYTHON:-python3}"

TORCH_VERSION=2.13.0
WW_VERSION=0.7.7

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi

pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==$TORCH_VERSION"
"${pip[@]}" "weightwatcher==$WW_VERSION" safetensors numpy

"$venv/bin/python" - "$TORCH_VERSION" "$WW_VERSION" <<'EOF'
import sys
from importlib.metadata import version

want_torch, want_ww = sys.argv[1:3]
torch_version = version("torch")
if torch_version.split("+")[0] != want_torch:
    sys.exit(f"torch {torch_version} installed, expected {want_torch}")
if version("weightwatcher") != want_ww:
    sys.exit(f"weightwatcher {version('weightwatcher')} installed, expected {want_ww}")
print(f"{sys.prefix}: torch {torch_version}, weightwatcher {want_ww}")
EOF

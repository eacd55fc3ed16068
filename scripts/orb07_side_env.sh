#!/usr/bin/env bash
# Rebuild the Python 3.12 side environment for orb-models 0.7 and run atomuq's orb adapter tests in it.
#
#   bash scripts/orb07_side_env.sh            # create /work/venvs/orb07 if missing, install, test
#   bash scripts/orb07_side_env.sh --fresh    # delete the environment first
#   VENV=/elsewhere PYTHON312=/path/to/python3.12 bash scripts/orb07_side_env.sh
#
# Not part of CI: orb-models 0.7 needs Python >= 3.12, where torch comes from PyPI as a CUDA
# build (about 3 GB with its nvidia-* packages; it runs on the CPU). TORCH_VERSION is the one
# `pip install --dry-run torch 'orb-models>=0.7,<0.8'` picked on Python 3.12 here (the machines'
# pip constraint caps torch at 2.14.1); it is pinned in every pip call so nothing moves it.
# Everything of atomuq's [test] extra installs on 3.12 (tblite 0.8.0 has a cp312 wheel).
# Prints the versions, the pytest counts and the wall time; exits with pytest's status.
set -euo pipefail

VENV=${VENV:-/work/venvs/orb07}
TORCH_VERSION=${TORCH_VERSION:-2.14.1}
ORB_SPEC=${ORB_SPEC:-orb-models>=0.7,<0.8}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

find_python312() {
    if [[ -n "${PYTHON312:-}" ]]; then echo "$PYTHON312"; return; fi
    # a pyenv shim named python3.12 exists but refuses to run unless 3.12 is selected
    if python3.12 --version >/dev/null 2>&1; then command -v python3.12; return; fi
    local root
    root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
    for p in "$root"/versions/3.12*/bin/python3.12; do
        [[ -x "$p" ]] && { echo "$p"; return; }
    done
    echo "python3.12 not found: set PYTHON312=/path/to/python3.12" >&2
    exit 2
}

start=$(date +%s)
[[ "${1:-}" == "--fresh" ]] && rm -rf "$VENV"
PY312=$(find_python312)
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "== creating $VENV with $PY312 ($("$PY312" --version))"
    "$PY312" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install --quiet --progress-bar off)
echo "== torch==$TORCH_VERSION (CUDA build from PyPI, several GB on a fresh environment)"
"${PIP[@]}" "torch==$TORCH_VERSION"
echo "== $ORB_SPEC"
"${PIP[@]}" "$ORB_SPEC" "torch==$TORCH_VERSION"
echo "== atomuq from $ROOT (editable, [test] extra)"
"${PIP[@]}" -e "$ROOT[test]" "torch==$TORCH_VERSION"
installed=$(date +%s)

"$VENV/bin/python" - <<'EOF'
import sys
from importlib.metadata import version
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "(cuda build" if torch.version.cuda else "(cpu build",
      f"{torch.version.cuda})" if torch.version.cuda else ")", "| orb-models", version("orb-models"),
      "| ase", version("ase"), "| numpy", version("numpy"))
EOF

cd "$ROOT"
log=$(mktemp)
set +e
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_adapter_orb.py tests/test_conformance.py tests/test_ensemble.py -k "orb" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
end=$(date +%s)
echo "== summary: $(tail -n 1 "$log" | sed 's/=//g; s/^ *//')"
echo "== install $((installed - start)) s, tests $((end - installed)) s, total $((end - start)) s; pytest exit $status"
rm -f "$log"
exit "$status"

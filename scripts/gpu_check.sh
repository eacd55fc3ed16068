#!/usr/bin/env bash
# The GPU check of issue 16 (part 5): install what is missing on a bare CUDA machine, then run
# scripts/gpu_check.py (score, md, train one epoch, LTAU, faiss on the GPU if it installs, and
# 1,000-atom Force Delta steps per second for every bundled model, all with --device cuda).
# About ten minutes on one GPU; writes $OUT (default ./gpu_out): summary.md, summary.json,
# steps.log, install.log.
#
#   bash scripts/gpu_check.sh                      # install what is missing (auto), run on cuda
#   bash scripts/gpu_check.sh --cpu-dry-run        # the same logic on the cpu at tiny sizes (no GPU numbers)
#   bash scripts/gpu_check.sh --install make       # `make install` into .venv first (its torch==2.13.0 must
#                                                  # then be a CUDA build: it is, from PyPI, on a GPU machine;
#                                                  # machines with a local CPU wheel of 2.13.0 get that one)
#   bash scripts/gpu_check.sh --install none       # use $PYTHON as it is
#   bash scripts/gpu_check.sh --download-wheels    # HERE, for a GPU machine with no package registry: put the
#                                                  # wheels it lacks in .whl/ (carried with the tree)
# Any other argument goes to gpu_check.py (e.g. --only score speed, --device cuda:1).
#
# --install auto (the default) uses $PYTHON (default python3) as it is when it already imports every
# dependency with a CUDA torch (CUDA images usually ship torch); else installs the missing ones, in
# this order: wheels in $WHEELS (default .whl/, no index), then the package registry (plain pip; a
# missing torch comes as PyPI's default CUDA build). atomuq itself runs from src/ (PYTHONPATH), so
# nothing of the checkout is built. faiss with GPU support (faiss-gpu, CUDA 12 libraries, about
# 1 GB) is tried into a side folder only where the registry answers; the LTAU check says which faiss ran.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/atomuq_gpu_site}
OUT=${OUT:-./gpu_out}
INSTALL=auto
ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --install) INSTALL=$2; shift 2 ;;
        --install=*) INSTALL=${1#*=}; shift ;;
        --download-wheels) INSTALL=download; shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
export OUT
mkdir -p "$OUT"
LOG="$OUT/install.log"
: >"$LOG"
say() { echo "gpu_check: $*" | tee -a "$LOG"; }

# module -> distribution of every dependency the checks import (faiss is needed by LTAU only)
DEPS="torch:torch numpy:numpy scipy:scipy ase:ase vesin:vesin typer:typer rich:rich matplotlib:matplotlib faiss:faiss-cpu"
# the ones a CUDA image is most likely to lack: what --download-wheels fetches
CARRY=${CARRY:-"ase vesin faiss-cpu"}

missing() {  # distributions whose module does not import in $PYTHON
    "$PYTHON" - "$DEPS" <<'EOF'
import importlib.util, sys
print(" ".join(d for m, d in (p.split(":") for p in sys.argv[1].split()) if importlib.util.find_spec(m) is None))
EOF
}

REGISTRY=""
registry_answers() {  # the configured package index answers within seconds (asked once; no host named here)
    if [[ -z "$REGISTRY" ]]; then
        if timeout 20 "$PYTHON" -m pip index versions pip --retries 0 --timeout 5 >/dev/null 2>&1; then
            REGISTRY=yes
        else
            REGISTRY=no
            say "no package registry answers"
        fi
    fi
    [[ "$REGISTRY" == yes ]]
}

if [[ "$INSTALL" == download ]]; then
    PYV=${WHEEL_PYTHON:-3.12}  # the device image's python3 (3.12.3 when last seen)
    mkdir -p "$WHEELS"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" $CARRY 2>&1 | grep -v '^WARNING: Location' | tee -a "$LOG"
    du -ch "$WHEELS"/*.whl | tee -a "$LOG"
    say "carry $WHEELS/ (.gitignore ignores .whl/) with the tree; tree and carried paths travel within 64 MiB: drop faiss-cpu (CARRY=\"ase vesin\") if it does not fit"
    exit 0
fi

case "$INSTALL" in
    make)
        say "make install PYTHON=$PYTHON (.venv, torch==2.13.0, extras test,orb,metatomic,view)"
        make install PYTHON="$PYTHON" >>"$LOG" 2>&1 || { say "make install failed (see $LOG)"; exit 3; }
        PYTHON=.venv/bin/python ;;
    auto)
        if compgen -G "$WHEELS/*.whl" >/dev/null; then
            say "installing the wheels in $WHEELS into $SITE (no index)"
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl >>"$LOG" 2>&1 \
                && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        fi
        need=$(missing)
        if [[ -n "$need" ]]; then
            if registry_answers; then
                say "pip install $need"
                # shellcheck disable=SC2086
                timeout 900 "$PYTHON" -m pip install -q $need >>"$LOG" 2>&1 \
                    || timeout 900 "$PYTHON" -m pip install -q --target "$SITE" $need >>"$LOG" 2>&1 \
                    || say "pip install failed (see $LOG)"
                export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
            else
                say "missing: $need (carry their wheels: --download-wheels on a machine with the registry)"
            fi
        fi
        if [[ " ${ARGS[*]-} " != *" --cpu-dry-run "* ]] && registry_answers; then
            if timeout 600 "$PYTHON" -m pip install -q --target "$SITE-faiss-gpu" faiss-gpu >>"$LOG" 2>&1; then
                export FAISS_GPU_PATH="$SITE-faiss-gpu"
                say "faiss-gpu installed into $FAISS_GPU_PATH (used by the faiss check only)"
            else
                say "faiss-gpu did not install: the faiss check reports CPU faiss only"
            fi
        fi ;;
    none) ;;
    *) say "--install must be auto, make or none, got $INSTALL"; exit 2 ;;
esac

need=$(missing)
"$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1 | tee -a "$LOG"
if [[ " $need " == *" faiss-cpu "* ]]; then
    say "faiss is missing: the LTAU and faiss checks report it and the others run"
    need=${need//faiss-cpu/}
fi
if [[ -n "${need// /}" ]]; then
    say "cannot run: missing $need"
    printf '# atomuq GPU check\n\nNot run: %s could not import %s (see install.log).\n' "$PYTHON" "$need" >"$OUT/summary.md"
    exit 3
fi
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" scripts/gpu_check.py --out "$OUT" "${ARGS[@]}"

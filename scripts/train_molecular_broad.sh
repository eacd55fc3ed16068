#!/usr/bin/env bash
# Train molecular-broad (configs/train_molecular_broad.toml) on the broad molecular set's finished jobs, and with
# --members the rest of its five-member ensemble (molecular-broad-seed1..4: the same config, 20 epochs each). Resumable: rerun the same command after a kill; each `atomuq train` continues from its
# run folder's train_state.pt (the export is rewritten only when the set changed).
#   bash scripts/train_molecular_broad.sh [--device cuda] [--members]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEVICE=cpu; MEMBERS=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2;;
        --members) MEMBERS=1; shift;;
        *) echo "unknown option $1" >&2; exit 2;;
    esac
done
if [ ! -f out/molecular_broad/train.extxyz.gz ] || [ data/molecular_broad/state.json -nt out/molecular_broad/train.extxyz.gz ]; then
    PYTHONPATH=src "$PY" scripts/build_broad_molecular_set.py --export out/molecular_broad
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PYTHONPATH=src "$PY" -m atomuq.cli.main train configs/train_molecular_broad.toml --device "$DEVICE"
if [ "$MEMBERS" = 1 ]; then
    for seed in 1 2 3 4; do
        PYTHONPATH=src "$PY" -m atomuq.cli.main train configs/train_molecular_broad.toml --device "$DEVICE" \
            --seed $seed --epochs 20 --run-dir runs/molecular_broad_seed$seed
    done
fi

#!/usr/bin/env bash
# Train a model of the new reference sets on that set's finished jobs: molecular-broad (configs/train_molecular_broad.toml,
# data/molecular_broad) or materials (configs/train_materials.toml, data/materials); with --members its five-member
# ensemble for the ensemble baseline (runs/<set>_member1..5: the same config at 64 wide and 2 layers, seeds 1-5, 20
# epochs each: 99,828 parameters, 0.6x the main model's training step: 24 against 40 ms for 16 molecules on one
# thread, so the ensemble fits the training budget). Resumable: rerun the same command after
# a kill or in a later session; each `atomuq train` continues from its run folder's train_state.pt (the runs count
# their error logs as histograms, so an unfinished run folder is a few MB to commit). The export is rewritten only when
# the set changed.
#   bash scripts/train_new_models.sh molecular_broad|materials [--device cuda] [--members]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SET=${1:-}
case "$SET" in
    molecular_broad) BUILD=scripts/build_broad_molecular_set.py;;
    materials) BUILD=scripts/build_materials_set.py;;
    *) echo "usage: bash scripts/train_new_models.sh molecular_broad|materials [--device cuda] [--members]" >&2; exit 2;;
esac
shift
DEVICE=cpu; MEMBERS=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2;;
        --members) MEMBERS=1; shift;;
        *) echo "unknown option $1" >&2; exit 2;;
    esac
done
if [ ! -f "out/$SET/train.extxyz.gz" ] || [ "data/$SET/state.json" -nt "out/$SET/train.extxyz.gz" ]; then
    PYTHONPATH=src "$PY" "$BUILD" --export "out/$SET"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PYTHONPATH=src "$PY" -m atomuq.cli.main train "configs/train_$SET.toml" --device "$DEVICE"
if [ "$MEMBERS" = 1 ]; then
    for seed in 1 2 3 4 5; do
        PYTHONPATH=src "$PY" -m atomuq.cli.main train "configs/train_$SET.toml" --device "$DEVICE" \
            --seed $seed --epochs 20 --run-dir "runs/${SET}_member$seed" --set error_log.last_epochs=20 \
            --set model.latent=64 --set model.hidden=64 --set model.confidence_hidden=64 --set model.num_layers=2
    done
fi

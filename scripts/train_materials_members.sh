#!/usr/bin/env bash
# The materials ensemble on one CPU core each: members SEED... (runs/materials_memberN), 64 wide, 2 layers, the
# main model's 8 epochs (configs/train_materials.toml: the main model has 8), every epoch in the error log.
# Resumable: rerun after a kill. Needs `PYTHONPATH=src python scripts/build_materials_set.py --export out/materials`.
#   OMP_NUM_THREADS=1 bash scripts/train_materials_members.sh 1 2 3 4
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for seed in "$@"; do
    PYTHONPATH=src "$PY" -m atomuq.cli.main train configs/train_materials.toml --device cpu \
        --seed "$seed" --epochs 8 --run-dir "runs/materials_member$seed" --set error_log.last_epochs=8 \
        --set model.latent=64 --set model.hidden=64 --set model.confidence_hidden=64 --set model.num_layers=2
done

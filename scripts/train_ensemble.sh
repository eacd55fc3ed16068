#!/usr/bin/env bash
# Train the ensemble members of the bundled molecular model (seeds 1..4; seed 0 is the bundled
# model itself) with the same recipe, two at a time, and copy them into the package.
# EPOCHS (default 40, half the bundled model's 80 to fit one session: ~17 min per member with
# two members sharing the 2-core development machine).
# Usage: [EPOCHS=N] scripts/train_ensemble.sh [SEED ...]   (default 1 2 3 4); rerun to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=("${@:-1 2 3 4}")
seeds=(${seeds[*]})
run() {
  OMP_NUM_THREADS=1 .venv/bin/atomuq train configs/train_molecular.toml --seed "$1" --run-dir "runs/molecular_seed$1" \
    --epochs "${EPOCHS:-40}" \
    > "runs/molecular_seed$1.log" 2>&1
  cp "runs/molecular_seed$1/best.pt" "src/atomuq/data/models/molecular-small-seed$1.pt"
}
mkdir -p runs
for ((k = 0; k < ${#seeds[@]}; k += 2)); do
  run "${seeds[k]}" &
  if ((k + 1 < ${#seeds[@]})); then run "${seeds[k + 1]}" & fi
  wait
done

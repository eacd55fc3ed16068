"""Every shipped training config parses (keys, values, model sizes) without its data being at hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from atomuq.models.native import NativeModel
from atomuq.workflows.train import TrainConfig
from atomuq.workflows.train.config import native_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("train_*.toml")), ids=lambda p: p.name)
def test_training_config_parses_and_builds_its_model(path):
    config = TrainConfig.from_toml(path)
    assert config.epochs >= 1 and config.data.train
    model = NativeModel(native_config(config.model_settings()))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_new_models_count_the_last_epochs_and_the_materials_model_fits_stress():
    broad = TrainConfig.from_toml(ROOT / "configs/train_molecular_broad.toml")
    materials = TrainConfig.from_toml(ROOT / "configs/train_materials.toml")
    assert broad.error_log.form == materials.error_log.form == "histogram"
    assert broad.error_log.skip_epochs(broad.epochs) == 20  # 40 epochs: LTAU's p_i from the last 20
    assert broad.error_log.skip_epochs(20) == 0  # ensemble members (--epochs 20) count every epoch
    assert materials.error_log.skip_epochs(materials.epochs) == 0  # a short run: every epoch counted
    assert materials.model_settings()["direct_stress"] and materials.loss.stress > 0
    assert 30 not in broad.model["elements"] and {14, 29, 30} <= set(materials.model["elements"])  # Si Cu Zn

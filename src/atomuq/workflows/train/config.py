"""Configuration of `atomuq train`: the dataclasses of a training TOML file, read by the one binder (toml_config).

Top level: run_dir, epochs, batch_size, seed, device, dtype, init_from, ...; tables [data],
[model] (NativeConfig keys plus preset), [loss] (workflows/losses.py), [optimizer] and [error_log]. Paths in a
config file are relative to the folder of that file.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ase.data import atomic_numbers as SYMBOL_TO_Z

from atomuq.core.validate import DEFAULT_MIN_DISTANCE
from atomuq.models.native import NativeConfig
from atomuq.models.native.config import PRESETS
from atomuq.workflows.losses import LossConfig
from atomuq.workflows.toml_config import At, ConfigError, FieldError, bind, coerce, read_toml, to_jsonable, with_overrides

SCHEDULES = ("cosine", "plateau", "constant")
#: forms of the per-atom error log a training run writes (workflows/error_log.py)
ERROR_LOG_FORMS = ("full", "histogram")
#: select_best_by -> the metric (validation MAE, or training MAE without a validation set) that picks best.pt
BEST_BY = {"forces": "forces_mae", "conservative_forces": "conservative_forces_mae", "energy": "energy_mae_per_atom"}


@dataclass(frozen=True)
class DataConfig:
    """Training and validation files (extxyz or anything ASE reads) and where their labels are.

    energy_key / forces_key / stress_key: info/array names of the labels; unset means the
    calculator results ASE attaches on reading, else REF_energy / REF_forces / REF_stress.
    min_distance: Å, atoms closer than this make a structure invalid.
    validation_fraction: hold out this fraction of the training structures for validation when no
    validation files are given, chosen by validation_seed (independent of the training seed, so
    that runs with different seeds share one training set and their error logs line up for LTAU).
    atom_weights: .npy of one loss weight per training atom, in error-log order (after the
    validation split), e.g. from `atomuq ltau weights`; they scale each atom's force-loss terms.
    """

    train: tuple[Path, ...]
    validation: tuple[Path, ...] = ()
    validation_fraction: float = 0.0
    validation_seed: int = 0
    atom_weights: Path | None = None
    energy_key: str | None = None
    forces_key: str | None = None
    stress_key: str | None = None
    min_distance: float = DEFAULT_MIN_DISTANCE

    def __post_init__(self) -> None:
        if len(self.train) == 0:
            raise FieldError("train", "must name at least one file")
        if self.min_distance < 0:
            raise FieldError("min_distance", f"must be >= 0 Å, got {self.min_distance}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise FieldError("validation_fraction", f"must be in [0, 1), got {self.validation_fraction}")
        if self.validation_fraction > 0 and self.validation:
            raise FieldError("validation_fraction", "and validation files: give either the files or the fraction, "
                             "not both")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule (stepped once per epoch).

    lr: initial learning rate; schedule: cosine (to min_lr over the planned epochs), plateau
    (ReduceLROnPlateau on the selection metric, factor/patience) or constant; grad_clip: max
    gradient norm (0 disables).
    """

    lr: float = 1e-3
    weight_decay: float = 1e-6
    schedule: str = "cosine"
    min_lr: float = 1e-6
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    grad_clip: float = 10.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise FieldError("lr", f"must be positive, got {self.lr}")
        for name in ("weight_decay", "min_lr", "grad_clip"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise FieldError("schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.plateau_factor < 1:
            raise FieldError("plateau_factor", f"must be in (0, 1), got {self.plateau_factor}")
        if self.plateau_patience < 0:
            raise FieldError("plateau_patience", f"must be >= 0, got {self.plateau_patience}")


@dataclass(frozen=True)
class ErrorLogConfig:
    """The run's per-atom force-error log for LTAU (methods.md section 4; workflows/error_log.py).

    form: full (float32 errors of every epoch: 8 bytes per training atom and epoch, rows for the planned epochs
    allocated at the start) or histogram (per-atom counts on bins_per_decade log-spaced bins per decade over
    1e-3..1e2 eV/Å, the compact form `atomuq ltau compact` writes, kept up to date after every epoch: a resumable
    run carries a few MB instead of a row per epoch; p_i exact at the bin edges, log-linear inside a bin).
    last_epochs: histogram form only, count the last epochs only (0: every epoch; a run of fewer epochs counts them
    all), as LTAU's p_i are read from late epochs (a full log keeps every epoch and `atomuq ltau fit --skip-epochs`
    skips at fit time; counts cannot be split later)."""

    form: str = "full"
    last_epochs: int = 0
    bins_per_decade: int = 10

    def __post_init__(self) -> None:
        if self.form not in ERROR_LOG_FORMS:
            raise FieldError("form", f"must be one of {', '.join(ERROR_LOG_FORMS)}, got {self.form!r}")
        if self.last_epochs < 0:
            raise FieldError("last_epochs", f"must be >= 0, got {self.last_epochs}")
        if self.last_epochs and self.form == "full":
            raise FieldError("last_epochs", "applies to form = \"histogram\" only (a full log keeps every epoch; "
                             "`atomuq ltau fit --skip-epochs` skips the early ones)")
        if not 1 <= self.bins_per_decade <= 100:
            raise FieldError("bins_per_decade", f"must be 1 to 100, got {self.bins_per_decade}")

    def skip_epochs(self, epochs: int) -> int:
        """Epochs of a run of `epochs` epochs left out of the counts."""
        return max(0, epochs - self.last_epochs) if self.last_epochs else 0


def native_config(model_table: Mapping[str, Any], elements: Sequence[int] | None = None) -> NativeConfig:
    """NativeConfig from a [model] table (preset expanded); elements fill in when the table has none."""
    settings = dict(model_table)
    preset = settings.pop("preset", None)
    merged = {**(PRESETS[preset] if preset else {}), **settings}
    if elements is not None and "elements" not in merged:
        merged["elements"] = tuple(elements)
    return NativeConfig.from_dict(merged)


def _elements(value: Any, at: At) -> list[int]:
    """model.elements: symbols or atomic numbers, as atomic numbers."""
    if not isinstance(value, list) or not value:
        raise at.error(f"expected a list of element symbols or atomic numbers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, str) and v in SYMBOL_TO_Z:
            out.append(SYMBOL_TO_Z[v])
        elif isinstance(v, int) and not isinstance(v, bool):
            out.append(v)
        else:
            raise at.error(f"{v!r} is not an element symbol or atomic number")
    return out


def _model_table(value: Any, at: At) -> dict[str, Any]:
    """[model]: NativeConfig keys (typed as NativeConfig declares them) and an optional preset."""
    if not isinstance(value, dict):
        raise at.error(f"expected a table, got {value!r}")
    hints = typing.get_type_hints(NativeConfig)
    out: dict[str, Any] = {}
    for key, v in value.items():
        here = at.child(key)
        if key == "preset":
            if v not in PRESETS:
                raise here.error(f"must be one of {', '.join(PRESETS)}, got {v!r}", separator=" ")
            out[key] = v
        elif key == "elements":
            out[key] = _elements(v, here)
        elif key in hints:
            out[key] = coerce(v, hints[key], here)
        else:
            raise at.unknown(key, sorted(hints) + ["preset"])
    try:
        native_config(out, elements=(1,) if "elements" not in out else None)
    except (ValueError, TypeError) as exc:
        raise at.error(str(exc)) from None
    return out


@dataclass(frozen=True)
class TrainConfig:
    """Everything `atomuq train` needs; build it with TrainConfig.from_toml(path).

    run_dir: output folder. epochs: planned epochs. batch_size: structures per step.
    eval_batch_size: structures per evaluation batch (default batch_size). init_from: model
    file to fine-tune (its architecture is kept; [model] must then be empty).
    fit_reference_energies: least-squares per-element energies and scales from the training
    set (default: yes for a fresh model, no when fine-tuning). select_best_by: forces,
    conservative_forces or energy (validation MAE; training MAE when there is no validation set).
    model: NativeConfig keys plus an optional preset (small, default); elements default to
    those in the data. device: cpu, cuda or cuda:N. dtype: float32 or float64.
    """

    run_dir: Path
    data: DataConfig
    epochs: int = 100
    batch_size: int = 8
    eval_batch_size: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    init_from: Path | None = None
    augment_rotations: bool = True
    fit_reference_energies: bool | None = None
    select_best_by: str = "forces"
    model: dict[str, Any] = field(default_factory=dict, metadata={"toml": _model_table})
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    error_log: ErrorLogConfig = field(default_factory=ErrorLogConfig)
    source: Path | None = field(default=None, compare=False, metadata={"toml": False})

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise FieldError("epochs", f"must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise FieldError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise FieldError("eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        if self.dtype not in ("float32", "float64"):
            raise FieldError("dtype", f"must be float32 or float64, got {self.dtype!r}")
        if self.select_best_by not in BEST_BY:
            raise FieldError("select_best_by", f"must be one of {', '.join(BEST_BY)}, got {self.select_best_by!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise FieldError("device", f"must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.init_from is not None and self.model:
            raise FieldError(f"model.{sorted(self.model)[0]}", "is set but the architecture comes from init_from "
                             "when fine-tuning; remove the [model] table")
        if self.init_from is None:
            native_config(self.model, elements=(1,) if "elements" not in self.model else None)
        if self.loss.stress > 0 and self.init_from is None and not self.model_settings().get("direct_stress", False):
            raise FieldError("loss.stress", "> 0 fits the direct stress head: set model.direct_stress = true "
                             "(or use loss.conservative_stress for the virial stress)")

    def model_settings(self) -> dict[str, Any]:
        """The NativeConfig keys of [model] with the preset expanded (elements not yet filled in)."""
        settings = dict(self.model)
        preset = settings.pop("preset", None)
        return {**PRESETS.get(preset, {}), **settings} if preset else settings

    @property
    def batch_size_eval(self) -> int:
        """Structures per evaluation batch."""
        return self.eval_batch_size or self.batch_size

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> "TrainConfig":
        """Read a TOML config file; errors name the file and the key. overrides (dotted key -> value, None
        skipped; paths absolute) replace the file's values before it is checked, so errors name their key too."""
        path = Path(path)
        return cls.from_dict(with_overrides(read_toml(path), overrides), base_dir=path.parent, source=path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | Path = ".", source: Path | None = None,
                  prefix: str = "") -> "TrainConfig":
        """Build from a nested dict (as TOML gives); relative paths are taken relative to base_dir; prefix: where
        the table sits in its file ('finetune.'), for messages."""
        return bind(cls, dict(data), source=source, base=base_dir, prefix=prefix, extra={"source": source})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as absolute strings) for metadata and resume checks."""
        return to_jsonable(self)


__all__ = ["BEST_BY", "ERROR_LOG_FORMS", "SCHEDULES", "ConfigError", "DataConfig", "ErrorLogConfig", "OptimizerConfig",
           "TrainConfig", "native_config", "read_toml"]

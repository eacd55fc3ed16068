"""Training and fine-tuning the native model (`atomuq train CONFIG`).

Losses (workflows/losses.py): Huber on energy per atom, direct forces, conservative forces,
stress (direct head and virial), the equigrad term λ‖Δ_rot‖² and the confidence head's
cross-entropy against the model's own binned direct-force errors (Orb-v3). Random-rotation
augmentation, per-element reference energies by least squares, AdamW with a cosine or
plateau schedule, validation each epoch, best/last checkpoints, a resumable training state
written atomically each epoch, and the per-atom force-error log of LTAU-FF
(workflows/error_log.py).

Run folder: best.pt, last.pt (atomuq model files), train_state.pt, metrics.csv (one row per
epoch), config.toml (copy of the config file), config_resolved.json, error_log/.

Paths in a config file are relative to the folder of that file.
"""

from __future__ import annotations

import dataclasses
import csv
import difflib
import json
import math
import shutil
import time
import uuid
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from ase.data import atomic_numbers as SYMBOL_TO_Z
from ase.data import chemical_symbols

import atomuq
from atomuq.core.batch import Batch
from atomuq.core.device import resolve_device
from atomuq.core.errors import AtomuqError, InputError
from atomuq.core.io import (Record, atomic_path, file_sha256, read_structures, reference_energy, reference_forces,
                            reference_stress)
from atomuq.core.rotations import random_rotations
from atomuq.core.validate import DEFAULT_MIN_DISTANCE, check_structure
from atomuq.models.checkpoint import load_model, save_model, weights_fingerprint
from atomuq.models.derivatives import VOIGT, evaluate, rotational_gradient_norm
from atomuq.models.native import NativeConfig, NativeModel
from atomuq.models.native.config import PRESETS
from atomuq.workflows.error_log import ErrorLogWriter
from atomuq.workflows.losses import TERMS, LossConfig, Targets, compute_losses, force_error_norm

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STATE_FILE = "train_state.pt"
BEST_FILE = "best.pt"
LAST_FILE = "last.pt"
METRICS_FILE = "metrics.csv"
CONFIG_COPY = "config.toml"
CONFIG_RESOLVED = "config_resolved.json"
ERROR_LOG_DIR = "error_log"
STATE_FORMAT = "atomuq-train-state"
SCHEDULES = ("cosine", "plateau", "constant")
BEST_BY = {"forces": "forces_mae", "conservative_forces": "conservative_forces_mae", "energy": "energy_mae_per_atom"}
#: metrics.csv columns, in order (units: losses as in losses.py, MAEs in eV/atom and eV/Å, Δ_rot in eV, time in s)
METRIC_COLUMNS = (
    ["epoch", "lr", "train_loss"] + [f"train_loss_{t}" for t in TERMS]
    + [f"{s}_{m}" for s in ("train", "val") for m in ("energy_mae_per_atom", "forces_mae", "conservative_forces_mae",
                                                     "rotational_gradient")]
    + ["best", "wall_time_s", "fingerprint"]
)


class ConfigError(AtomuqError):
    """A training configuration that cannot be used; the message names the file and key."""


class TrainingError(AtomuqError):
    """Training stopped (NaN loss, diverged gradients); the message says at which epoch and batch."""


# ----------------------------------------------------------------------------------------------
# configuration


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
            raise ValueError("data.train must name at least one file")
        if self.min_distance < 0:
            raise ValueError(f"data.min_distance must be >= 0 Å, got {self.min_distance}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.validation_fraction > 0 and self.validation:
            raise ValueError("give either data.validation files or data.validation_fraction, not both")


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
            raise ValueError(f"optimizer.lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.min_lr < 0 or self.grad_clip < 0:
            raise ValueError("optimizer.weight_decay, optimizer.min_lr and optimizer.grad_clip must be >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.plateau_factor < 1:
            raise ValueError(f"optimizer.plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if self.plateau_patience < 0:
            raise ValueError(f"optimizer.plateau_patience must be >= 0, got {self.plateau_patience}")


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
    model: dict[str, Any] = field(default_factory=dict)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    source: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or (self.eval_batch_size is not None and self.eval_batch_size < 1):
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.select_best_by not in BEST_BY:
            raise ValueError(f"select_best_by must be one of {', '.join(BEST_BY)}, got {self.select_best_by!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.init_from is not None and self.model:
            raise ValueError(f"model.{sorted(self.model)[0]}: the architecture comes from init_from when fine-tuning; "
                             "remove the [model] table")
        if self.init_from is None:
            native_config(self.model, elements=(1,) if "elements" not in self.model else None)
        if self.loss.stress > 0 and self.init_from is None and not self.model_settings().get("direct_stress", False):
            raise ValueError("loss.stress > 0 fits the direct stress head: set model.direct_stress = true "
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
    def from_toml(cls, path: str | Path) -> "TrainConfig":
        """Read a TOML config file; errors name the file and the bad key."""
        path = Path(path)
        return cls.from_dict(read_toml(path), base_dir=path.parent, source=path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | Path = ".", source: Path | None = None) -> "TrainConfig":
        """Build from a nested dict (as TOML gives); relative paths are taken relative to base_dir."""
        where = str(source) if source is not None else "config"
        base = Path(base_dir).resolve()
        try:
            return _build(cls, data, "", where, base, source)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as absolute strings) for metadata and resume checks."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "source":
                continue
            value = getattr(self, f.name)
            if f.name in ("data", "loss", "optimizer"):
                value = {k: _jsonable(v) for k, v in asdict(value).items()}
            out[f.name] = _jsonable(value)
        return out


def read_toml(path: Path) -> dict[str, Any]:
    """The tables of a TOML config file; ConfigError naming the file when it is missing or not TOML."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


_SECTIONS = {"data": DataConfig, "loss": LossConfig, "optimizer": OptimizerConfig}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _unknown_key(key: str, known: Sequence[str], where: str, prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    section = f" in [{prefix[:-1]}]" if prefix else ""
    return ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}; known keys{section}: {', '.join(sorted(known))}")


def _coerce(value: Any, kind: str, key: str, where: str, base: Path) -> Any:
    kind = kind.replace(" | None", "").strip()
    bad = ConfigError(f"{where}: key '{key}' expects {kind.replace('tuple[Path, ...]', 'a list of paths')}, "
                      f"got {value!r} ({type(value).__name__})")
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise ConfigError(f"{where}: key '{key}' must be finite, got {value}")
        return float(value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return int(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise bad
        return value
    if kind == "Path":
        if not isinstance(value, str) or not value:
            raise bad
        return (base / Path(value).expanduser()).resolve()
    if kind == "tuple[Path, ...]":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
            raise bad
        return tuple((base / Path(v).expanduser()).resolve() for v in items)
    raise AssertionError(kind)  # pragma: no cover


def config_section(cls: type, table: Any, prefix: str, where: str, base: Path) -> Any:
    """A dataclass of plain fields (float, int, bool, str, Path, path lists) from a TOML table; errors name
    the file (where) and the key (prefix + name); relative paths are taken from base."""
    return _build(cls, table, prefix, where, base, None)


def _build(cls: type, table: Any, prefix: str, where: str, base: Path, source: Path | None) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: '{prefix[:-1]}' must be a table, got {type(table).__name__}")
    specs = {f.name: f for f in fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in specs:
            raise _unknown_key(key, list(specs), where, prefix)
        kind = specs[key].type
        if key in _SECTIONS and cls is TrainConfig:
            kwargs[key] = _build(_SECTIONS[key], value, f"{key}.", where, base, None)
        elif key == "model" and cls is TrainConfig:
            kwargs[key] = _model_table(value, where, base)
        else:
            kwargs[key] = _coerce(value, str(kind), prefix + key, where, base)
    missing = [name for name, f in specs.items()
               if name not in kwargs and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(prefix + m for m in missing)}")
    if cls is TrainConfig:
        kwargs["source"] = source
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _model_table(value: Any, where: str, base: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'model' must be a table")
    known = {f.name for f in fields(NativeConfig)} | {"preset"}
    out = {}
    for key, v in value.items():
        if key not in known:
            raise _unknown_key(key, sorted(known), where, "model.")
        if key == "preset" and v not in PRESETS:
            raise ConfigError(f"{where}: model.preset must be one of {', '.join(PRESETS)}, got {v!r}")
        if key == "elements":
            v = _elements(v, where)
        out[key] = v
    try:
        native_config(out, elements=(1,) if "elements" not in out else None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: [model]: {exc}") from exc
    return out


def _elements(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: model.elements must be a list of symbols or atomic numbers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, str) and v in SYMBOL_TO_Z:
            out.append(SYMBOL_TO_Z[v])
        elif isinstance(v, int) and not isinstance(v, bool):
            out.append(v)
        else:
            raise ConfigError(f"{where}: model.elements: {v!r} is not an element symbol or atomic number")
    return out


def native_config(model_table: dict[str, Any], elements: Sequence[int] | None = None) -> NativeConfig:
    """NativeConfig from a [model] table (preset expanded); elements fill in when the table has none."""
    settings = dict(model_table)
    preset = settings.pop("preset", None)
    merged = {**(PRESETS[preset] if preset else {}), **settings}
    if elements is not None and "elements" not in merged:
        merged["elements"] = tuple(elements)
    return NativeConfig.from_dict(merged)


# ----------------------------------------------------------------------------------------------
# data


@dataclass
class LabelledData:
    """Structures and their labels, concatenated in file order.

    offsets: (S+1,) global id of each structure's first atom; numbers: (N,); forces: (N, 3)
    eV/Å; energy: (S,) eV or None when the files have no energies; stress: (S, 6) eV/Å³ Voigt
    valid where stress_mask (periodic and labelled); files: path, sha256, counts per file.
    """

    records: list[Record]
    offsets: np.ndarray
    numbers: np.ndarray
    forces: np.ndarray
    energy: np.ndarray | None
    stress: np.ndarray
    stress_mask: np.ndarray
    files: list[dict[str, Any]]
    data_hash: str
    atom_weights: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def n_atoms(self) -> int:
        """Total number of atoms."""
        return int(self.offsets[-1])

    def batch(self, indices: Sequence[int], device: torch.device | str, dtype: torch.dtype) -> tuple[Batch, Targets]:
        """Batch of the structures at indices with their targets (eV, eV/Å, eV/Å³)."""
        idx = np.asarray(indices, dtype=np.int64)
        batch = Batch.from_atoms([self.records[i].atoms for i in idx], device=device, dtype=dtype)
        atom_index = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])
        t = lambda x, dt=dtype: torch.as_tensor(x, dtype=dt, device=device)  # noqa: E731
        energy = self.energy[idx] if self.energy is not None else np.zeros(len(idx))
        targets = Targets(
            energy=t(energy), has_energy=self.energy is not None, forces=t(self.forces[atom_index]),
            stress=t(self.stress[idx]), stress_mask=t(self.stress_mask[idx], torch.bool), n_atoms=batch.n_atoms,
            force_weights=None if self.atom_weights is None else t(self.atom_weights[atom_index]),
        )
        return batch, targets


STRUCTURE_FRAMES = "structure_frames.npy"  # (structures, 2): training-file number and frame index in that file


def split_validation(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic split into (training, validation) records, each kept in file order."""
    n_val = int(round(fraction * len(records)))
    if n_val < 1 or n_val >= len(records):
        raise ConfigError(f"data.validation_fraction {fraction} of {len(records)} structures leaves an empty split")
    held = set(np.random.default_rng(seed).permutation(len(records))[:n_val].tolist())
    return ([r for k, r in enumerate(records) if k not in held], [r for k, r in enumerate(records) if k in held])


def load_labelled(paths: Sequence[Path], data: DataConfig, elements: Sequence[int] | None, need_energy: bool,
                  what: str) -> LabelledData:
    """Read and check every structure and label of the files (energies eV, forces eV/Å, stress eV/Å³)."""
    records = read_structures(paths)
    return labelled_from_records(records, data, elements, need_energy, what, paths)


def labelled_from_records(records: list[Record], data: DataConfig, elements: Sequence[int] | None, need_energy: bool,
                          what: str, paths: Sequence[Path]) -> LabelledData:
    """Check labels of already-read records and gather them into arrays; errors name file and structure."""
    energies, forces, stresses, has_stress = [], [], [], []
    for rec in records:
        atoms = rec.atoms
        check_structure(atoms, rec.where, elements, data.min_distance)
        f = reference_forces(atoms, data.forces_key)
        if f is None:
            key = data.forces_key or "the calculator's forces or REF_forces"
            raise InputError(f"{rec.where}: no reference forces ({key}); every {what} structure needs forces: "
                             "label it or remove it")
        if f.shape != (len(atoms), 3) or not np.isfinite(f).all():
            raise InputError(f"{rec.where}: reference forces must be finite with shape ({len(atoms)}, 3), got {f.shape}")
        forces.append(f)
        e = reference_energy(atoms, data.energy_key)
        if e is not None and not math.isfinite(e):
            raise InputError(f"{rec.where}: reference energy is {e}")
        energies.append(e)
        try:
            s = reference_stress(atoms, data.stress_key)
        except ValueError as exc:
            raise InputError(f"{rec.where}: {exc}") from exc
        usable = s is not None and bool(np.all(atoms.pbc))
        if usable and not np.isfinite(s).all():
            raise InputError(f"{rec.where}: reference stress contains NaN or infinite values")
        stresses.append(s if usable else np.zeros(6))
        has_stress.append(usable)
    labelled = [e is not None for e in energies]
    if any(labelled) and not all(labelled):
        first = records[labelled.index(False)]
        raise InputError(f"{first.where}: no reference energy while other {what} structures have one "
                         f"({sum(labelled)} of {len(records)}); label every structure or none")
    if need_energy and not all(labelled):
        key = data.energy_key or "the calculator's energy or REF_energy"
        raise InputError(f"{records[0].where}: no reference energy ({key}) but loss.energy > 0; "
                         "label the energies or set loss.energy = 0")
    n_atoms = np.array([len(r.atoms) for r in records], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_atoms)])
    data_hash, hashes = file_sha256(paths)
    # each file's first record (not frame 0: a validation split may have taken it)
    starts = [k for k, r in enumerate(records) if k == 0 or r.source != records[k - 1].source] + [len(records)]
    if len(starts) - 1 != len(paths):
        raise ValueError(f"records of {len(starts) - 1} files for {len(paths)} paths")
    files = [{"path": str(p), "sha256": h, "n_structures": int(starts[k + 1] - starts[k]),
              "n_atoms": int(offsets[starts[k + 1]] - offsets[starts[k]])} for k, (p, h) in enumerate(zip(paths, hashes))]
    return LabelledData(
        records=records, offsets=offsets, numbers=np.concatenate([r.atoms.numbers for r in records]),
        forces=np.concatenate(forces), energy=np.array(energies, dtype=float) if all(labelled) else None,
        stress=np.stack(stresses), stress_mask=np.array(has_stress, dtype=bool), files=files, data_hash=data_hash,
    )


def load_atom_weights(path: Path, n_atoms: int) -> np.ndarray:
    """Per-atom loss weights (dimensionless, finite, >= 0, one per training atom) from a .npy file."""
    try:
        weights = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: cannot read the atom weights ({exc})") from exc
    if weights.shape != (n_atoms,):
        raise InputError(f"{path}: {weights.shape} atom weights for {n_atoms} training atoms; the weights must come "
                         "from a run on the same training files and validation split")
    if not np.isfinite(weights).all() or (weights < 0).any() or not weights.sum() > 0:
        raise InputError(f"{path}: atom weights must be finite, >= 0 and not all zero")
    return weights.astype(np.float64)


def composition_matrix(numbers: np.ndarray, offsets: np.ndarray, elements: Sequence[int]) -> np.ndarray:
    """(S, K) count of each element (in elements order) in each structure, from concatenated numbers (N,)."""
    lookup = np.full(119, -1, dtype=np.int64)
    lookup[np.asarray(elements)] = np.arange(len(elements))
    species = lookup[numbers]
    if (species < 0).any():
        raise ValueError(f"atomic numbers {sorted(set(numbers[species < 0].tolist()))} not in elements {list(elements)}")
    structure = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    counts = np.bincount(structure * len(elements) + species, minlength=(len(offsets) - 1) * len(elements))
    return counts.reshape(len(offsets) - 1, len(elements)).astype(float)


def fit_reference_energies(numbers: np.ndarray, offsets: np.ndarray, energies: np.ndarray,
                           elements: Sequence[int]) -> tuple[np.ndarray, int]:
    """Per-element reference energies (eV) minimising Σ_s (E_s − Σ_k c_sk e_k)², and the rank of the fit.

    With fewer independent compositions than elements the minimum-norm solution is returned
    (the rank says how many combinations are determined).
    """
    counts = composition_matrix(numbers, offsets, elements)
    solution, _, rank, _ = np.linalg.lstsq(counts, np.asarray(energies, dtype=float), rcond=None)
    return solution, int(rank)


# ----------------------------------------------------------------------------------------------
# augmentation


def voigt_to_matrix(voigt: torch.Tensor) -> torch.Tensor:
    """(B, 6) Voigt xx, yy, zz, yz, xz, xy -> (B, 3, 3) symmetric."""
    out = voigt.new_zeros(voigt.shape[0], 3, 3)
    for k, (a, b) in enumerate(VOIGT):
        out[:, a, b] = voigt[:, k]
        out[:, b, a] = voigt[:, k]
    return out


def rotate(batch: Batch, targets: Targets, rotations: torch.Tensor) -> tuple[Batch, Targets]:
    """Rotate positions, cell rows, reference forces and stress of each structure by its matrix (B, 3, 3)."""
    rot = rotations.to(device=batch.device, dtype=batch.dtype)
    per_atom = rot[batch.batch]
    positions = torch.einsum("nij,nj->ni", per_atom, batch.positions)
    cell = torch.einsum("bij,bkj->bki", rot, batch.cell)
    forces = torch.einsum("nij,nj->ni", per_atom, targets.forces)
    sigma = rot @ voigt_to_matrix(targets.stress) @ rot.transpose(1, 2)
    stress = torch.stack([sigma[:, a, b] for a, b in VOIGT], dim=1)
    return batch.replace(positions=positions, cell=cell), dataclasses.replace(targets, forces=forces, stress=stress)


# ----------------------------------------------------------------------------------------------
# evaluation


def evaluate_set(model: NativeModel, data: LabelledData, batch_size: int, writer: ErrorLogWriter | None = None
                 ) -> dict[str, float]:
    """MAEs of a labelled set in eval mode (energy eV/atom, force components eV/Å), mean ‖Δ_rot‖ (eV);
    with a writer, the per-atom error norms (eV/Å) of direct and conservative forces go to the log."""
    was_training = model.training
    model.eval()
    sums = {"energy": 0.0, "forces": 0.0, "conservative": 0.0, "rot": 0.0}
    try:
        for start in range(0, len(data), batch_size):
            idx = list(range(start, min(start + batch_size, len(data))))
            batch, targets = data.batch(idx, model.device, model.dtype)
            pred = evaluate(model, batch, conservative=True, rotational=True)
            direct, conservative = pred.forces_direct.detach(), pred.forces_conservative.detach()
            if writer is not None:
                writer.write(int(data.offsets[start]),
                             force_error_norm(direct, targets.forces).cpu().numpy().astype(np.float32),
                             force_error_norm(conservative, targets.forces).cpu().numpy().astype(np.float32))
            sums["forces"] += float((direct - targets.forces).abs().sum())
            sums["conservative"] += float((conservative - targets.forces).abs().sum())
            sums["rot"] += float(rotational_gradient_norm(pred).detach().sum())
            if targets.has_energy:
                sums["energy"] += float(((pred.energy.detach() - targets.energy) / batch.n_atoms).abs().sum())
    finally:
        model.train(was_training)
    components = 3 * data.n_atoms
    out = {"forces_mae": sums["forces"] / components, "conservative_forces_mae": sums["conservative"] / components,
           "rotational_gradient": sums["rot"] / len(data)}
    if data.energy is not None:
        out["energy_mae_per_atom"] = sums["energy"] / len(data)
    return out


# ----------------------------------------------------------------------------------------------
# training


class TrainCallback:
    """Hooks the training loop calls (progress bars, tests); every method is optional."""

    def on_start(self, info: dict[str, Any]) -> None:
        """Called once with run_dir, n_train, n_val, n_atoms, epochs, start_epoch, resumed."""

    def on_epoch_start(self, epoch: int, n_batches: int) -> None:
        """Called before the first batch of epoch (1-based)."""

    def on_batch_end(self, epoch: int, batch: int, n_batches: int, loss: float) -> None:
        """Called after each optimiser step (batch 1-based)."""

    def on_epoch_end(self, epoch: int, row: dict[str, Any], model: NativeModel, improved: bool) -> None:
        """Called after the epoch's evaluation and files are written (row: the metrics.csv row)."""


@dataclass
class TrainResult:
    """Outcome of a training run: final model (eval mode), epochs done, best epoch and metric, metrics history."""

    run_dir: Path
    model: NativeModel
    epochs_completed: int
    start_epoch: int
    best_epoch: int
    best_metric: float
    best_metric_name: str
    history: list[dict[str, Any]]
    wall_time_s: float
    training_data_hash: str


def _device(name: str, where: str) -> torch.device:
    try:
        return resolve_device(name)
    except InputError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _scheduler(optimizer: torch.optim.Optimizer, config: OptimizerConfig, epochs: int) -> Any:
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=config.min_lr)
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=config.plateau_factor,
                                                          patience=config.plateau_patience, min_lr=config.min_lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _set_scales(model: NativeModel, data: LabelledData, fit: bool) -> dict[str, Any]:
    """Fit per-element reference energies (eV) by least squares and set the energy and force scales.

    Both scales are the RMS of the reference force components (eV/Å, times 1 Å for the energy
    scale), as in MACE/NequIP: the energy head's output then has forces of the right size from
    the start; on a small EMT set this fitted the conservative forces about twice as fast as
    scaling by the residual energy spread per atom (that spread is reported in the info).
    """
    info: dict[str, Any] = {"fitted": False}
    if not fit:
        return info
    forces_rms = float(np.sqrt(np.mean(data.forces ** 2)))
    scale = forces_rms if forces_rms > 1e-6 else 1.0
    if data.energy is not None:
        refs, rank = fit_reference_energies(data.numbers, data.offsets, data.energy, model.elements)
        counts = composition_matrix(data.numbers, data.offsets, model.elements)
        residual_per_atom = (data.energy - counts @ refs) / np.diff(data.offsets)
        with torch.no_grad():
            model.reference_energies.copy_(torch.as_tensor(refs, dtype=model.reference_energies.dtype))
        info.update(reference_energies={chemical_symbols[z]: float(e) for z, e in zip(model.elements, refs)},
                    rank=rank, residual_std_per_atom=float(np.std(residual_per_atom)))
    with torch.no_grad():
        model.energy_scale.fill_(scale)
        model.force_scale.fill_(scale)
    info.update(fitted=True, energy_scale=scale, force_scale=scale)
    return info


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})


def _config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def _comparable(config_dict: dict[str, Any]) -> dict[str, Any]:
    # the device and the run folder's location may change between sessions without changing the run, and so may
    # the folder of the input files (a run copied to another machine with its data): files are compared by name,
    # their contents by hash (the training data hash)
    out = {k: v for k, v in config_dict.items() if k not in ("device", "run_dir")}
    name = lambda p: None if p is None else Path(p).name  # noqa: E731
    out["data"] = {**out["data"], "train": [name(p) for p in out["data"]["train"]],
                   "validation": [name(p) for p in out["data"]["validation"]], "atom_weights": name(out["data"]["atom_weights"])}
    out["init_from"] = name(out["init_from"])
    return out


def train_model(config: TrainConfig, resume: bool | None = None, callback: TrainCallback | None = None) -> TrainResult:
    """Train or fine-tune a native model as configured (energies eV, forces eV/Å); returns the final model.

    resume: None resumes when run_dir holds train_state.pt and starts fresh otherwise; True
    requires the state file; False refuses to touch an existing run.
    """
    callback = callback or TrainCallback()
    where = str(config.source or "config")
    run_dir = Path(config.run_dir)
    state_path = run_dir / STATE_FILE
    has_state = state_path.is_file()
    if resume is True and not has_state:
        raise ConfigError(f"{state_path}: no training state to resume; run without --resume to start a new run")
    if resume is False and has_state:
        raise ConfigError(f"{state_path}: a run already exists here; resume it or choose a new run_dir")
    resuming = has_state
    if not resuming and run_dir.exists():
        leftovers = [n for n in (BEST_FILE, LAST_FILE, METRICS_FILE, ERROR_LOG_DIR) if (run_dir / n).exists()]
        if leftovers:
            raise ConfigError(f"{run_dir}: holds {', '.join(leftovers)} from another run but no {STATE_FILE}; "
                              "choose a new run_dir or delete that folder")
    device = _device(config.device, where)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32

    state: dict[str, Any] | None = None
    if resuming:
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged file
            raise ConfigError(f"{state_path}: unreadable training state ({type(exc).__name__}: {exc}); "
                              f"delete {run_dir} to start over, or use a new run_dir") from exc
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ConfigError(f"{state_path}: not an atomuq training state")
        diffs = _config_differences(_comparable(state["config"]), _comparable(config.to_dict()))
        if diffs:
            raise ConfigError(f"{where}: differs from the run being resumed in {run_dir} ({'; '.join(diffs)}); "
                              "restore those values or use a new run_dir")

    # model (fresh, fine-tuned or resumed) and its elements
    init_model: NativeModel | None = None
    if state is not None:
        model_config = NativeConfig.from_dict(state["model_config"])
    elif config.init_from is not None:
        init_model = load_model(config.init_from)
        model_config = init_model.config
    else:
        model_config = None
    train_records = read_structures(config.data.train)
    val_records = read_structures(config.data.validation) if config.data.validation else []
    if config.data.validation_fraction > 0:
        train_records, val_records = split_validation(train_records, config.data.validation_fraction,
                                                      config.data.validation_seed)
    if model_config is None:
        settings = config.model_settings()
        if "elements" in settings:
            elements = settings["elements"]
        else:
            elements = np.unique(np.concatenate([r.atoms.numbers for r in train_records + val_records])).tolist()
        model_config = native_config(config.model, elements=elements)
    elements = list(model_config.elements)
    need_energy = config.loss.energy > 0 or config.select_best_by == "energy"
    train_data = labelled_from_records(train_records, config.data, elements, need_energy, "training", config.data.train)
    val_data = (labelled_from_records(val_records, config.data, elements, need_energy, "validation",
                                     config.data.validation or config.data.train)
                if val_records else None)
    if config.data.atom_weights is not None:
        train_data.atom_weights = load_atom_weights(config.data.atom_weights, train_data.n_atoms)
    if (config.loss.stress > 0 or config.loss.conservative_stress > 0) and not train_data.stress_mask.any():
        raise ConfigError(f"{where}: loss.stress / loss.conservative_stress > 0 but no periodic training structure "
                          "has a stress label")
    if state is not None and state["training_data_hash"] != train_data.data_hash:
        raise ConfigError(f"{where}: the training files changed since the run in {run_dir} began "
                          f"(sha256 {train_data.data_hash[:12]} vs {state['training_data_hash'][:12]}); use a new run_dir")

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = NativeModel(model_config)
    scale_info: dict[str, Any] = {}
    if init_model is not None:
        model.load_state_dict(init_model.state_dict())
    fit = config.fit_reference_energies if config.fit_reference_energies is not None else config.init_from is None
    if fit and train_data.energy is None and config.fit_reference_energies:
        raise ConfigError(f"{where}: fit_reference_energies = true needs reference energies in the training files")
    if state is None:
        scale_info = _set_scales(model, train_data, fit)
    model = model.to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optimizer.lr, weight_decay=config.optimizer.weight_decay)
    scheduler = _scheduler(optimizer, config.optimizer, config.epochs)

    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        run_id, start_epoch = state["run_id"], int(state["epoch"])
        history, best_epoch, best_metric = list(state["history"]), int(state["best_epoch"]), float(state["best_metric"])
        wall_before, scale_info = float(state["wall_time_s"]), dict(state.get("scale_info", {}))
        writer = ErrorLogWriter.reopen(run_dir / ERROR_LOG_DIR, run_id=run_id, epochs_completed=start_epoch)
    else:
        run_id, start_epoch, history, best_epoch, best_metric, wall_before = uuid.uuid4().hex, 0, [], 0, math.inf, 0.0
        run_dir.mkdir(parents=True, exist_ok=True)
        if config.source is not None and Path(config.source).is_file():
            with atomic_path(run_dir / CONFIG_COPY) as tmp:
                shutil.copyfile(config.source, tmp)
        with atomic_path(run_dir / CONFIG_RESOLVED) as tmp:
            Path(tmp).write_text(json.dumps(config.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        writer = ErrorLogWriter.create(
            run_dir / ERROR_LOG_DIR, run_id=run_id, n_epochs=config.epochs, structure_offsets=train_data.offsets,
            numbers=train_data.numbers, reference_force_norms=np.linalg.norm(train_data.forces, axis=1),
            training_files=train_data.files, training_data_hash=train_data.data_hash,
            extra={"seed": config.seed, "atomuq_version": atomuq.__version__,
                   "init_from": str(config.init_from) if config.init_from else None,
                   "structure_frames": STRUCTURE_FRAMES},
        )
        # which frame of which training file each logged structure is (a validation split leaves gaps)
        file_number = np.repeat(np.arange(len(train_data.files)), [f["n_structures"] for f in train_data.files])
        frames = np.stack([file_number, [r.index for r in train_data.records]], axis=1).astype(np.int64)
        with atomic_path(run_dir / ERROR_LOG_DIR / STRUCTURE_FRAMES) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, frames)

    metric_key = BEST_BY[config.select_best_by]
    metric_stage = "val" if val_data is not None else "train"
    edges = model.confidence_bin_edges if model.has_confidence else None
    max_error = float(model.config.confidence_max_error)
    needs_graph = config.loss.needs_conservative or config.loss.needs_virial or config.loss.needs_rotational
    n_batches = math.ceil(len(train_data) / config.batch_size)
    callback.on_start({"run_dir": run_dir, "n_train": len(train_data), "n_val": len(val_data) if val_data else 0,
                       "n_atoms": train_data.n_atoms, "epochs": config.epochs, "start_epoch": start_epoch,
                       "resumed": state is not None, "elements": elements, "scales": scale_info,
                       "parameters": sum(p.numel() for p in model.parameters())})
    t0 = time.perf_counter()

    def metadata(epoch: int, kind: str, row: dict[str, Any]) -> dict[str, Any]:
        """What best.pt / last.pt carry besides the weights (losses, MAEs in eV/atom and eV/Å, wall time in s)."""
        return {
            "kind": kind, "run_id": run_id, "epoch": epoch, "epochs_planned": config.epochs, "seed": config.seed,
            "trained_on": ", ".join(Path(f["path"]).name for f in train_data.files),
            "training_files": train_data.files, "losses": {k: v for k, v in row.items() if k.startswith("train_loss")},
            "metrics": {k: v for k, v in row.items() if v is not None and k not in ("fingerprint",)},
            "best_epoch": best_epoch, "best_metric": f"{metric_stage}_{metric_key}",
            "wall_time_s": wall_before + time.perf_counter() - t0, "config": config.to_dict(),
            "init_from": str(config.init_from) if config.init_from else None, "scales": scale_info,
        }

    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            callback.on_epoch_start(epoch, n_batches)
            model.train()
            order = torch.randperm(len(train_data), generator=generator).tolist()
            totals: dict[str, float] = {}
            for b, start in enumerate(range(0, len(train_data), config.batch_size), 1):
                idx = order[start:start + config.batch_size]
                batch, targets = train_data.batch(idx, device, dtype)
                if config.augment_rotations:
                    batch, targets = rotate(batch, targets, random_rotations(len(idx), generator))
                pred = evaluate(model, batch, conservative=config.loss.needs_conservative, stress=config.loss.needs_virial,
                                rotational=config.loss.needs_rotational, create_graph=needs_graph)
                loss, terms = compute_losses(pred, targets, config.loss, edges, max_error)
                if not bool(torch.isfinite(loss)):
                    detail = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in terms.items())
                    raise TrainingError(f"loss became {float(loss.detach())} at epoch {epoch}, batch {b} of {n_batches} ({detail}); "
                                        f"lower optimizer.lr or check the labels; {run_dir} still holds epoch {epoch - 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.optimizer.grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip)
                    if not bool(torch.isfinite(norm)):
                        raise TrainingError(f"gradient norm became {float(norm)} at epoch {epoch}, batch {b} of "
                                            f"{n_batches}; lower optimizer.lr; {run_dir} still holds epoch {epoch - 1}")
                optimizer.step()
                totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0.0) + float(v.detach())
                callback.on_batch_end(epoch, b, n_batches, float(loss.detach()))

            writer.begin_epoch(epoch - 1)
            train_metrics = evaluate_set(model, train_data, config.batch_size_eval, writer)
            fingerprint = weights_fingerprint(model)
            try:
                writer.end_epoch(fingerprint)
            except FloatingPointError as exc:
                raise TrainingError(f"epoch {epoch}: {exc}; lower optimizer.lr; {run_dir} still holds epoch {epoch - 1}") from exc
            val_metrics = evaluate_set(model, val_data, config.batch_size_eval) if val_data is not None else {}
            score = (val_metrics if val_data is not None else train_metrics).get(metric_key)
            if score is None or not math.isfinite(score):
                raise TrainingError(f"epoch {epoch}: selection metric {metric_stage}_{metric_key} is {score}")
            lr = optimizer.param_groups[0]["lr"]
            if config.optimizer.schedule == "plateau":
                scheduler.step(score)
            else:
                scheduler.step()
            improved = score < best_metric
            if improved:
                best_metric, best_epoch = score, epoch
            row: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": totals["loss"] / n_batches}
            row.update({f"train_loss_{k}": totals[k] / n_batches for k in TERMS if k in totals})
            row.update({f"train_{k}": v for k, v in train_metrics.items()})
            row.update({f"val_{k}": v for k, v in val_metrics.items()})
            row.update(best=int(improved), wall_time_s=wall_before + time.perf_counter() - t0, fingerprint=fingerprint)
            history.append(row)
            model.eval()
            save_model(model, run_dir / LAST_FILE, train_data.data_hash, metadata(epoch, "last", row))
            if improved:
                save_model(model, run_dir / BEST_FILE, train_data.data_hash, metadata(epoch, "best", row))
            model.train()
            _write_metrics(run_dir / METRICS_FILE, history)
            train_state = {
                "format": STATE_FORMAT, "atomuq_version": atomuq.__version__, "run_id": run_id, "epoch": epoch,
                "config": config.to_dict(), "model_config": model.config.to_dict(), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
                "best_epoch": best_epoch, "best_metric": best_metric, "wall_time_s": row["wall_time_s"],
                "training_data_hash": train_data.data_hash, "scale_info": scale_info,
            }
            with atomic_path(state_path) as tmp:
                torch.save(train_state, tmp)
            callback.on_epoch_end(epoch, row, model, improved)
    finally:
        writer.close()
    model.eval()
    return TrainResult(run_dir=run_dir, model=model, epochs_completed=len(history), start_epoch=start_epoch,
                       best_epoch=best_epoch, best_metric=best_metric, best_metric_name=f"{metric_stage}_{metric_key}",
                       history=history, wall_time_s=wall_before + time.perf_counter() - t0,
                       training_data_hash=train_data.data_hash)

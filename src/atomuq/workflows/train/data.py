"""Training data: reading the files, the validation split, reference labels, per-file bookkeeping and batches.

Every structure keeps the number of the file it came from (`file_numbers`), so per-file counts
stay right when a split leaves a file with no structure in one set (a small file among several).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from atomuq.core.batch import Batch
from atomuq.core.errors import InputError
from atomuq.core.io import Record, file_sha256, read_structures, reference_energy, reference_forces, reference_stress
from atomuq.core.validate import check_structure
from atomuq.workflows.losses import Targets
from atomuq.workflows.toml_config import ConfigError
from atomuq.models.native import NativeConfig
from atomuq.workflows.train.config import DataConfig, TrainConfig, native_config


@dataclass
class FileRecords:
    """Structures read from a list of files: records in file order and, per record, the number of its file."""

    paths: tuple[Path, ...]
    records: list[Record]
    file_numbers: np.ndarray  # (S,) int64 index into paths

    def __len__(self) -> int:
        return len(self.records)

    def take(self, indices: Sequence[int]) -> "FileRecords":
        """The records at indices (in that order), with their file numbers."""
        idx = np.asarray(indices, dtype=np.int64)
        return FileRecords(self.paths, [self.records[i] for i in idx], self.file_numbers[idx])

    def counts(self) -> np.ndarray:
        """(F,) structures from each file (0 for a file with none in this set)."""
        return np.bincount(self.file_numbers, minlength=len(self.paths)).astype(np.int64)


def read_files(paths: Sequence[Path]) -> FileRecords:
    """Every structure of every file, in order; an unreadable or empty file raises InputError naming it."""
    per_file = [read_structures([p]) for p in paths]
    numbers = np.repeat(np.arange(len(paths), dtype=np.int64), [len(r) for r in per_file])
    return FileRecords(tuple(Path(p) for p in paths), [r for recs in per_file for r in recs], numbers)


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (training, validation) positions among n structures, each sorted (file order kept)."""
    n_val = int(round(fraction * n))
    if n_val < 1 or n_val >= n:
        raise ConfigError(f"{fraction} of {n} structures leaves an empty split; change it or give validation files",
                          field="data.validation_fraction", separator=" ")
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def split_validation(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic split into (training, validation) records, each kept in file order."""
    train, val = split_indices(len(records), fraction, seed)
    return [records[k] for k in train], [records[k] for k in val]


def read_sets(data: DataConfig, where: str | None = None) -> tuple[FileRecords, FileRecords | None]:
    """The training and validation structures of a [data] table: validation files, a held-out fraction, or none."""
    train = read_files(data.train)
    if data.validation_fraction > 0:
        try:
            train_idx, val_idx = split_indices(len(train), data.validation_fraction, data.validation_seed)
        except ConfigError as exc:
            raise ConfigError(exc.reason, source=where, field=exc.field, separator=" ") from None
        return train.take(train_idx), train.take(val_idx)
    return train, (read_files(data.validation) if data.validation else None)


@dataclass
class LabelledData:
    """Structures and their labels, concatenated in file order.

    offsets: (S+1,) global id of each structure's first atom; numbers: (N,); forces: (N, 3)
    eV/Å; energy: (S,) eV or None when the files have no energies; stress: (S, 6) eV/Å³ Voigt
    valid where stress_mask (periodic and labelled); file_numbers: (S,) which file each
    structure is from; files: path, sha256, counts per file (zero counts included).
    """

    records: list[Record]
    file_numbers: np.ndarray
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

    def frames(self) -> np.ndarray:
        """(S, 2) int64: the file number and the frame index in that file of each structure."""
        return np.stack([self.file_numbers, [r.index for r in self.records]], axis=1).astype(np.int64)

    def batch(self, indices: Sequence[int], device: torch.device | str, dtype: torch.dtype) -> tuple[Batch, Targets]:
        """Batch of the structures at indices with their targets (eV, eV/Å, eV/Å³)."""
        idx = np.asarray(indices, dtype=np.int64)
        batch = Batch.from_atoms([self.records[i].atoms for i in idx], device=device, dtype=dtype)
        atom_index = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])
        t = lambda x, dt=dtype: torch.as_tensor(x, dtype=dt, device=device)  # noqa: E731
        energy = self.energy[idx] if self.energy is not None else np.zeros(len(idx))
        targets = Targets(
            energy=t(energy), has_energy=self.energy is not None, forces=t(self.forces[atom_index]),
            stress=t(self.stress[idx]), stress_mask=t(self.stress_mask[idx], torch.bool), n_atoms=batch.atoms_per_structure,
            force_weights=None if self.atom_weights is None else t(self.atom_weights[atom_index]),
        )
        return batch, targets


def elements_in(*sets: FileRecords | None) -> list[int]:
    """Sorted atomic numbers present in the sets."""
    return np.unique(np.concatenate([r.atoms.numbers for s in sets if s is not None for r in s.records])).tolist()


def _labels(rec: Record, data: DataConfig, what: str) -> tuple[np.ndarray, float | None, np.ndarray | None]:
    """Reference forces (eV/Å), energy (eV) and usable stress (eV/Å³, periodic structures only) of one record."""
    atoms = rec.atoms
    f = reference_forces(atoms, data.forces_key)
    if f is None:
        key = data.forces_key or "the calculator's forces or REF_forces"
        raise InputError(f"{rec.where}: no reference forces ({key}); every {what} structure needs forces: "
                         "label it or remove it")
    if f.shape != (len(atoms), 3) or not np.isfinite(f).all():
        raise InputError(f"{rec.where}: reference forces must be finite with shape ({len(atoms)}, 3), got {f.shape}")
    e = reference_energy(atoms, data.energy_key)
    if e is not None and not math.isfinite(e):
        raise InputError(f"{rec.where}: reference energy is {e}")
    try:
        s = reference_stress(atoms, data.stress_key)
    except ValueError as exc:
        raise InputError(f"{rec.where}: {exc}") from exc
    usable = s is not None and bool(np.all(atoms.pbc))
    if usable and not np.isfinite(s).all():
        raise InputError(f"{rec.where}: reference stress contains NaN or infinite values")
    return f, e, s if usable else None


def labelled(files: FileRecords, data: DataConfig, elements: Sequence[int] | None, need_energy: bool,
             what: str) -> LabelledData:
    """Check every structure and label (errors name file and structure) and gather them into arrays."""
    records = files.records
    forces, energies, stresses = [], [], []
    for rec in records:
        check_structure(rec.atoms, rec.where, elements, data.min_distance)
        f, e, s = _labels(rec, data, what)
        forces.append(f)
        energies.append(e)
        stresses.append(s)
    has_energy = [e is not None for e in energies]
    if any(has_energy) and not all(has_energy):
        first = records[has_energy.index(False)]
        raise InputError(f"{first.where}: no reference energy while other {what} structures have one "
                         f"({sum(has_energy)} of {len(records)}); label every structure or none")
    if need_energy and not all(has_energy):
        key = data.energy_key or "the calculator's energy or REF_energy"
        raise InputError(f"{records[0].where}: no reference energy ({key}) but loss.energy > 0; "
                         "label the energies or set loss.energy = 0")
    n_atoms = np.array([len(r.atoms) for r in records], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_atoms)])
    data_hash, hashes = file_sha256(files.paths)
    atoms_per_file = np.bincount(files.file_numbers, weights=n_atoms, minlength=len(files.paths))
    counts = files.counts()
    info = [{"path": str(p), "sha256": h, "n_structures": int(counts[k]), "n_atoms": int(atoms_per_file[k])}
            for k, (p, h) in enumerate(zip(files.paths, hashes))]
    return LabelledData(
        records=records, file_numbers=files.file_numbers, offsets=offsets,
        numbers=np.concatenate([r.atoms.numbers for r in records]), forces=np.concatenate(forces),
        energy=np.array(energies, dtype=float) if all(has_energy) else None,
        stress=np.stack([np.zeros(6) if s is None else s for s in stresses]),
        stress_mask=np.array([s is not None for s in stresses], dtype=bool), files=info, data_hash=data_hash,
    )


def load_labelled(paths: Sequence[Path], data: DataConfig, elements: Sequence[int] | None, need_energy: bool,
                  what: str) -> LabelledData:
    """Read and check every structure and label of the files (energies eV, forces eV/Å, stress eV/Å³)."""
    return labelled(read_files(paths), data, elements, need_energy, what)


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


@dataclass
class Sets:
    """The labelled training set and the validation set (None without one), and the model's elements."""

    train: LabelledData
    val: LabelledData | None
    elements: list[int]


def load_sets(config: TrainConfig, model_config: NativeConfig | None) -> tuple[Sets, NativeConfig]:
    """Read and check the training and validation structures (errors name file and structure); the model
    config, its elements taken from the data when neither the model nor the [model] table gives them."""
    where = str(config.source or "config")
    train_files, val_files = read_sets(config.data, where)
    if model_config is None:
        settings = config.model_settings()
        elements = settings["elements"] if "elements" in settings else elements_in(train_files, val_files)
        model_config = native_config(config.model, elements=elements)
    elements = list(model_config.elements)
    need_energy = config.loss.energy > 0 or config.select_best_by == "energy"
    train = labelled(train_files, config.data, elements, need_energy, "training")
    val = labelled(val_files, config.data, elements, need_energy, "validation") if val_files is not None else None
    if config.data.atom_weights is not None:
        train.atom_weights = load_atom_weights(config.data.atom_weights, train.n_atoms)
    if (config.loss.stress > 0 or config.loss.conservative_stress > 0) and not train.stress_mask.any():
        raise ConfigError("loss.stress / loss.conservative_stress > 0 but no periodic training structure has a "
                          "stress label", source=where)
    return Sets(train, val, elements), model_config

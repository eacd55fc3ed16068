"""The common shape of every UQ method's output, with names, units and orientation from the output schema."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from atomuq.core.schema import ATOM, STRUCTURE, Key, SchemaError, atom_key, lookup

Array = torch.Tensor | np.ndarray


def to_numpy(values: Array) -> np.ndarray:
    """A detached float64 (or integer) numpy copy of a tensor or array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = values.double() if values.is_floating_point() else values
        return values.numpy()
    array = np.asarray(values)
    return array.astype(np.float64) if array.dtype.kind == "f" else array


@dataclass
class UQResult:
    """Named per-atom (N,) and per-structure (B,) values of one or more UQ methods (torch tensors or numpy arrays).

    Names are quantities of the output schema (core.schema): per_structure["force_delta"] is written
    under force_delta, per_atom["force_delta"] under force_delta_atoms. units and orientation
    ("higher means less trusted", the opposite, or not a score) come from the registry, so a method
    cannot state them differently from the files. An unregistered name raises SchemaError.
    """

    per_atom: dict[str, Array] = field(default_factory=dict)
    per_structure: dict[str, Array] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.per_atom:
            self.key(name, ATOM)
        for name in self.per_structure:
            self.key(name, STRUCTURE)

    @staticmethod
    def key(name: str, level: str) -> Key:
        """The registered output key of quantity `name` at `level` (atom or structure)."""
        key = lookup(atom_key(name) if level == ATOM else name)
        if key.level != level:
            raise SchemaError(f"{name!r} is registered per {key.level}, not per {level}")
        return key

    def _keys(self) -> dict[str, Key]:
        keys = {name: self.key(name, STRUCTURE) for name in self.per_structure}
        keys.update({name: self.key(name, ATOM) for name in self.per_atom if name not in keys})
        return keys

    @property
    def units(self) -> dict[str, str]:
        """Unit of each quantity (the same at both levels)."""
        return {name: key.unit for name, key in self._keys().items()}

    @property
    def orientation(self) -> dict[str, str]:
        """"higher means less trusted", "higher means more trusted" or "not a score", per quantity."""
        return {name: key.orientation for name, key in self._keys().items()}

    def merged(self, *others: "UQResult | None") -> "UQResult":
        """One result holding this one's values and the others' (later ones win on a shared name)."""
        out = UQResult(dict(self.per_atom), dict(self.per_structure))
        for other in others:
            if other is not None:
                out.per_atom.update(other.per_atom)
                out.per_structure.update(other.per_structure)
        return out

    def outputs(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(per-atom, per-structure) numpy arrays under their output keys (force_delta_atoms, force_delta, ...)."""
        return ({self.key(n, ATOM).name: to_numpy(v) for n, v in self.per_atom.items()},
                {self.key(n, STRUCTURE).name: to_numpy(v) for n, v in self.per_structure.items()})

    def structures(self, ptr: Sequence[int]) -> list[dict[str, Any]]:
        """Per structure b (atoms ptr[b]:ptr[b+1]), the output values as core.schema.write_results takes them."""
        per_atom, per_structure = self.outputs()
        return split_outputs(per_atom, per_structure, ptr)


def split_outputs(per_atom: Mapping[str, Array], per_structure: Mapping[str, Array], ptr: Sequence[int]
                  ) -> list[dict[str, Any]]:
    """Per-structure dicts of output values from concatenated per-atom (N, ...) and stacked per-structure (B, ...) arrays."""
    bounds = [int(p) for p in ptr]
    n_structures = len(bounds) - 1
    atom_arrays = {name: to_numpy(v) for name, v in per_atom.items()}
    structure_arrays = {name: to_numpy(v) for name, v in per_structure.items()}
    for name, values in structure_arrays.items():
        if len(values) != n_structures:
            raise SchemaError(f"per-structure result {name} has {len(values)} values for {n_structures} structures")
    for name, values in atom_arrays.items():
        if len(values) != bounds[-1]:
            raise SchemaError(f"per-atom result {name} has {len(values)} values for {bounds[-1]} atoms")
    out = []
    for b in range(n_structures):
        values: dict[str, Any] = {name: v[bounds[b]:bounds[b + 1]] for name, v in atom_arrays.items()}
        values.update({name: v[b] for name, v in structure_arrays.items()})
        out.append(values)
    return out

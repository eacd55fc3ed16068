"""Shared fixtures: small native models in double precision and a synthetic pair-potential model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from atomuq.core.batch import Batch, scatter_sum
from atomuq.core.neighbors import build_graph, edge_vectors
from atomuq.models.native import NativeConfig, NativeModel
from atomuq.models.protocol import AtomisticModel, ModelOutput

ELEMENTS = (1, 6, 7, 8, 13, 29)


def make_native(seed: int = 0, **overrides) -> NativeModel:
    """A small randomly initialised native model in float64."""
    torch.manual_seed(seed)
    cfg = dict(elements=ELEMENTS, cutoff=4.0, latent=32, hidden=32, num_layers=2, confidence_hidden=16)
    cfg.update(overrides)
    model = NativeModel(NativeConfig(**cfg)).double().eval()
    with torch.no_grad():  # give the reference energies non-trivial values
        model.reference_energies.copy_(torch.linspace(-3.0, -1.0, len(cfg["elements"]), dtype=torch.float64))
    return model


@pytest.fixture(scope="session")
def native_model() -> NativeModel:
    return make_native()


@pytest.fixture(scope="session")
def native_stress_model() -> NativeModel:
    return make_native(seed=1, direct_stress=True)


class PairModel(AtomisticModel):
    """Invariant pair potential phi(r) = k (c - r)^3 for r < c, with a direct head equal to the
    analytic -dE/dr plus a known extra per-atom field (so the Force Delta is known exactly)."""

    def __init__(self, cutoff: float = 3.0, k: float = 0.2, field_scale: float = 0.0) -> None:
        super().__init__()
        self.cutoff = cutoff
        self.k = k
        self.field_scale = field_scale
        self.register_buffer("_dummy", torch.zeros((), dtype=torch.float64))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64

    @property
    def has_direct_forces(self) -> bool:
        return True

    def field(self, positions: torch.Tensor) -> torch.Tensor:
        """The known non-conservative part added to the direct forces, eV/Å."""
        return self.field_scale * torch.sin(positions.detach())

    def forward(self, batch: Batch) -> ModelOutput:
        graph = build_graph(batch, self.cutoff)
        vec = edge_vectors(batch, graph)
        r = torch.linalg.norm(vec, dim=-1)
        gap = (self.cutoff - r).clamp(min=0)
        energy = 0.5 * scatter_sum(self.k * gap**3, graph.edge_batch, batch.num_structures)
        dphi = -3 * self.k * gap**2  # phi'(r)
        analytic = scatter_sum((dphi / r)[:, None] * vec.detach(), graph.centers, batch.num_atoms)
        return ModelOutput(energy=energy, forces=analytic.detach() + self.field(batch.positions))


@pytest.fixture()
def pair_model() -> PairModel:
    return PairModel(field_scale=0.3)


def ethanol() -> Atoms:
    atoms = molecule("CH3CH2OH")
    atoms.positions += np.random.default_rng(1).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def copper_cell() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.positions += np.random.default_rng(2).normal(scale=0.08, size=atoms.positions.shape)
    return atoms


def triclinic_alcu() -> Atoms:
    """A small skewed periodic Al-Cu cell (cell shorter than the cutoff in one direction)."""
    atoms = Atoms("AlCu", scaled_positions=[[0, 0, 0], [0.5, 0.45, 0.55]],
                  cell=[[2.9, 0.0, 0.0], [0.6, 3.1, 0.0], [0.4, -0.5, 3.3]], pbc=True)
    atoms.positions += np.random.default_rng(3).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def _emt_label(atoms: Atoms) -> Atoms:
    atoms.calc = EMT()
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if atoms.pbc.all():
        results["stress"] = atoms.get_stress()
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def emt_structures(seed: int, n_cells: int, n_molecules: int) -> list[Atoms]:
    """EMT-labelled rattled Cu/Al fcc cells (with stress) and small molecules: tiny training data."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_cells):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        symbols = atoms.get_chemical_symbols()
        for i in rng.choice(len(atoms), size=k % 3, replace=False):
            symbols[i] = "Al"
        atoms.set_chemical_symbols(symbols)
        atoms.set_cell(atoms.cell * (1 + 0.01 * rng.normal()), scale_atoms=True)
        atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
        out.append(_emt_label(atoms))
    names = ["H2O", "NH3", "CH4", "CO2", "HCN", "CH3OH"]
    for k in range(n_molecules):
        atoms = molecule(names[k % len(names)])
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        out.append(_emt_label(atoms))
    return out

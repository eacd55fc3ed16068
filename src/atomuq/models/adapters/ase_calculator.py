"""Any ASE calculator as an atomuq model: energies, forces and stress, for ensembles and labels.

An ASE calculator is not a torch function, so its energy cannot be differentiated by autograd.
CalculatorModel returns, per structure, a stand-in energy that equals the calculator's energy
and whose first derivatives are the calculator's results:

    E*(r', h') = E - sum_i F_i . (r'_i - r_i) + <X, h' - h>,   X = h^-T (V sigma + sum_i r_i (x) F_i)

so -dE*/dr = F (the calculator's forces, taken as conservative) and, for periodic structures
with a stress, dE*/dg = V sigma under the strain of atomuq.models.derivatives, i.e. the
virial stress is the calculator's stress. For molecules the rotational gradient is then the
net torque of the forces, the exact value. Second derivatives are not available
(differentiable = False), and there is no direct force head, so the Force Delta is undefined;
the calculator's forces are its only forces (external_forces = True): ensembles use them in
either force mode.
"""

from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import BaseCalculator

from atomuq.core.batch import Batch, scatter_sum
from atomuq.core.errors import InputError
from atomuq.reference.ase_class import build_calculator
from atomuq.models.protocol import AtomisticModel, ModelOutput


class CalculatorModel(AtomisticModel):
    """Wrap an ASE calculator; forward evaluates it once per structure (float64, on the CPU)."""

    differentiable = False
    external_forces = True

    def __init__(self, calculator: BaseCalculator, name: str = "") -> None:
        super().__init__()
        self.calculator = calculator
        self.elements = None
        self.cutoff = 0.0
        self.source = (
            name or f"ase:{type(calculator).__module__}:{type(calculator).__name__}"
        )

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64

    def _stress(self, atoms: Atoms) -> np.ndarray | None:
        if "stress" not in getattr(self.calculator, "implemented_properties", ()):
            return None
        return atoms.get_stress(voigt=False)

    def forward(self, batch: Batch) -> ModelOutput:
        """Energy (B,) eV whose gradients are the calculator's forces (eV/Å) and, when periodic, stress."""
        positions = batch.positions.detach().cpu().double().numpy()
        cells = batch.cell.detach().cpu().double().numpy()
        pbcs = batch.pbc.cpu().numpy()
        ptr = batch.ptr.tolist()
        needs_cell_gradient = batch.cell.requires_grad
        energies, forces, cell_terms = [], [], np.zeros_like(cells)
        for b in range(batch.num_structures):
            r = positions[ptr[b] : ptr[b + 1]]
            atoms = Atoms(
                numbers=batch.numbers[ptr[b] : ptr[b + 1]].cpu().numpy(),
                positions=r,
                cell=cells[b],
                pbc=pbcs[b],
            )
            atoms.calc = self.calculator
            try:
                energies.append(atoms.get_potential_energy())
                f = atoms.get_forces()
            except Exception as exc:  # the calculator's own failure, named with the structure
                raise InputError(
                    f"{self.source} failed on structure {b} of the batch ({atoms.get_chemical_formula()}): "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            forces.append(f)
            if needs_cell_gradient and pbcs[b].all():
                sigma = self._stress(atoms)
                if sigma is None:
                    raise ValueError(
                        f"{self.source} gives no stress: the virial stress and rotational gradient of "
                        "periodic structures are undefined for it"
                    )
                target = atoms.get_volume() * sigma + r.T @ f
                cell_terms[b] = np.linalg.solve(cells[b].T, target)
        def t(x: object) -> torch.Tensor:
            return torch.as_tensor(np.asarray(x), dtype=batch.dtype, device=batch.device)

        force = t(np.concatenate(forces))
        shift = -(force * (batch.positions - batch.positions.detach())).sum(-1)
        energy = t(energies) + scatter_sum(shift, batch.structure_index, batch.num_structures)
        if needs_cell_gradient:
            energy = energy + (t(cell_terms) * (batch.cell - batch.cell.detach())).sum(
                (1, 2)
            )
        return ModelOutput(energy=energy)


def calculator_model(path: str) -> CalculatorModel:
    """CalculatorModel from 'MODULE:CLASS' (e.g. 'ase.calculators.emt:EMT'), the class built without arguments."""
    where = f"ase:{path}"
    return CalculatorModel(build_calculator(path, where), name=where)

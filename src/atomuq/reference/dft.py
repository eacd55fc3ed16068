"""Kohn-Sham DFT for molecules through PySCF (an optional extra): PBE/6-31G* with density fitting by default."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import CalculationFailed, Calculator, all_changes

from atomuq.reference.method import ReferenceMethod


class PySCFDFT(Calculator):
    """Kohn-Sham DFT for molecules through PySCF: energy in eV and forces in eV/Å (restricted, or unrestricted for odd electron counts)."""

    implemented_properties = ["energy", "free_energy", "forces"]
    default_parameters = {
        "xc": "pbe", "basis": "6-31g*", "density_fit": True, "charge": 0, "spin": None,
        "conv_tol": 1e-9, "max_cycle": 100, "grid_level": 3,
    }

    def calculate(self, atoms: Atoms | None = None, properties: Sequence[str] = ("energy",),
                  system_changes: Sequence[str] = all_changes) -> None:
        """Run the SCF and the analytic gradient; CalculationFailed when the SCF does not converge."""
        from ase.units import Bohr, Hartree
        from pyscf import dft, gto

        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        if a.pbc.any():
            raise CalculationFailed("PySCFDFT handles molecules only (pbc=False)")
        p = self.parameters
        charge = int(p.charge)
        spin = int(p.spin) if p.spin is not None else int((int(a.numbers.sum()) - charge) % 2)
        mol = gto.M(atom=[(s, tuple(x)) for s, x in zip(a.get_chemical_symbols(), a.positions)],
                    unit="Angstrom", basis=p.basis, charge=charge, spin=spin, verbose=0)
        mf = dft.RKS(mol) if spin == 0 else dft.UKS(mol)
        mf.xc = p.xc
        mf.conv_tol = p.conv_tol
        mf.max_cycle = p.max_cycle
        mf.grids.level = p.grid_level
        if p.density_fit:
            mf = mf.density_fit()
        energy = mf.kernel()
        if not mf.converged:
            raise CalculationFailed(f"PySCF {p.xc}/{p.basis} SCF did not converge in {p.max_cycle} cycles")
        gradient = mf.nuc_grad_method().kernel()
        self.results["energy"] = self.results["free_energy"] = float(energy) * Hartree
        self.results["forces"] = -np.asarray(gradient) * Hartree / Bohr


def pyscf_dft_calculator(**options: Any) -> Calculator:
    """A PySCFDFT calculator; ImportError at once (for the install hint) when pyscf is missing."""
    import pyscf  # noqa: F401

    return PySCFDFT(**options)


DFT_PBE = ReferenceMethod(
    "dft-pbe", "PBE/6-31G* with density fitting (PySCF), molecules", pyscf_dft_calculator, periodic=False,
    package="pyscf")

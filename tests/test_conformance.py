"""One conformance suite for every model kind that installs here, against the model protocol.

Each kind is a tiny random-weight model (or an ASE calculator) in float64: the native model
(with a direct stress head), the analytic pair model of conftest, orb (Orb-v3 direct and
conservative, orb-models 0.5.5), a metatomic PET (metatrain) and EMT through the ASE-calculator
adapter. Checks: the declared protocol attributes are present, typed and agree with what forward
returns (direct forces and stress, node features, confidence logits, shapes); conservative forces
equal finite differences of the energy; the virial stress equals finite differences of a strain;
translation invariance; a batch equals its structures one by one; second derivatives exist
exactly when declared; save/load round trip where the kind has a file format. A kind whose
package is missing is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from atomuq.core.batch import Batch
from atomuq.models.derivatives import VOIGT, Prediction, evaluate
from atomuq.models.protocol import AtomisticModel
from atomuq.models.registry import resolve_model
from conftest import PairModel, make_native

H = 1e-5  # Å (positions) and strain, central differences in float64


@dataclass
class Kind:
    """A model under test and, where its kind has a file format, how to write it and load it back."""

    model: AtomisticModel
    round_trip: Callable[[AtomisticModel, Path], AtomisticModel] | None = None


def _native() -> Kind:
    from atomuq.models.checkpoint import save_model

    def round_trip(model: AtomisticModel, folder: Path) -> AtomisticModel:
        return resolve_model(str(save_model(model, folder / "native.pt"))).double()

    # weights rounded to float32 (as model files store them), so that the loaded copy is exact
    return Kind(make_native(seed=7, direct_stress=True).float().double(), round_trip)


def _pair() -> Kind:
    return Kind(PairModel())  # no extra field: that one depends on absolute positions by design


def _orb(architecture: str) -> Callable[[], Kind]:
    def build() -> Kind:
        pytest.importorskip("orb_models", reason="orb-models is not installed (pip install 'atomuq[orb]')")
        from atomuq.models.adapters.orb import save_orb
        from model_kinds import small_orb

        def round_trip(model: AtomisticModel, folder: Path) -> AtomisticModel:
            return resolve_model(f"orb:{save_orb(model, folder / 'orb.pt')}").double()

        # built in float32, as load_orb builds, then widened: the loaded copy is exact
        return Kind(small_orb(architecture, seed=3).double(), round_trip)

    return build


def _metatomic() -> Kind:
    pytest.importorskip("metatomic.torch", reason="metatomic-torch is not installed (pip install 'atomuq[metatomic]')")
    pytest.importorskip("metatrain.pet", reason="metatrain is not installed (pip install 'atomuq[metatomic]')")
    import warnings

    from atomuq.models.adapters.metatomic import MetatomicModel
    from model_kinds import small_pet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = small_pet(seed=2).export()

    def round_trip(model: AtomisticModel, folder: Path) -> AtomisticModel:
        path = folder / "pet.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported.save(str(path))
        return resolve_model(f"metatomic:{path}")

    return Kind(MetatomicModel(exported, source="in memory").eval(), round_trip)


def _fairchem(architecture: str) -> Callable[[], Kind]:
    def build() -> Kind:
        pytest.importorskip("fairchem.core", reason="fairchem-core is not installed (pip install 'atomuq[fairchem]')")
        from atomuq.models.adapters.fairchem import save_fairchem
        from model_kinds import small_fairchem

        def round_trip(model: AtomisticModel, folder: Path) -> AtomisticModel:
            return resolve_model(f"fairchem:{save_fairchem(model, folder / 'fairchem.pt')}")  # in the stored dtype

        return Kind(small_fairchem(architecture, seed=4, dtype=torch.float64), round_trip)

    return build


def _pretrained(name: str, module: str) -> Callable[[], Kind]:
    def build() -> Kind:
        pytest.importorskip(module, reason=f"{module} is not installed (pip install 'atomuq[pretrained]')")

        def round_trip(model: AtomisticModel, folder: Path) -> AtomisticModel:
            return resolve_model(name).double()  # weights from the package, by short name

        return Kind(resolve_model(name).double(), round_trip)

    return build


def _emt() -> Kind:
    return Kind(resolve_model("ase:ase.calculators.emt:EMT"))


KINDS = {
    "native": _native,
    "pair": _pair,
    "orb-v3-direct": _orb("orb-v3-direct"),
    "orb-v3-conservative": _orb("orb-v3-conservative"),
    "metatomic-pet": _metatomic,
    "fairchem-esen-direct": _fairchem("esen-direct"),
    "fairchem-uma-direct": _fairchem("uma-direct"),
    "chgnet": _pretrained("chgnet", "chgnet"),
    "sevennet-0": _pretrained("sevennet-0", "sevenn"),
    "ase-emt": _emt,
}


@pytest.fixture(scope="module", params=list(KINDS))
def kind(request) -> Kind:
    return KINDS[request.param]()


def methanol() -> Atoms:
    """A rattled molecule of H, C, O (elements every kind knows)."""
    atoms = molecule("CH3OH")
    atoms.positions += np.random.default_rng(11).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def skewed_box() -> Atoms:
    """Water and ammonia in a small triclinic periodic cell (neighbours across the faces)."""
    atoms = molecule("H2O") + molecule("NH3")
    atoms.positions[3:] += [2.1, 1.4, 1.2]
    atoms.set_cell([[4.6, 0.0, 0.0], [0.5, 4.8, 0.0], [0.3, -0.4, 5.0]])
    atoms.pbc = True
    atoms.positions += np.random.default_rng(12).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


STRUCTURES = {"molecule": methanol, "periodic": skewed_box}


def batch_of(*structures: Atoms) -> Batch:
    return Batch.from_atoms(list(structures), dtype=torch.float64)


def energy(model: AtomisticModel, batch: Batch) -> float:
    """Total energy of the batch in eV (forward only)."""
    return float(model(batch).energy.detach().sum())


def test_protocol_attributes_are_declared_typed_and_true(kind):
    model = kind.model
    assert isinstance(model.cutoff, float) and model.cutoff >= 0
    assert model.elements is None or all(isinstance(z, int) and 1 <= z <= 118 for z in model.elements)
    assert isinstance(model.source, str)
    for flag in ("differentiable", "external_forces", "has_direct_forces", "has_direct_stress", "has_confidence",
                 "has_node_features"):
        assert isinstance(getattr(model, flag), bool), flag
    edges = model.confidence_bin_edges
    assert model.has_confidence == (edges is not None)
    if edges is not None:
        assert edges.dim() == 1 and len(edges) >= 2 and bool((edges[1:] > edges[:-1]).all())
    assert model.dtype.is_floating_point and isinstance(model.device, torch.device)
    assert not (model.external_forces and model.has_direct_forces)
    # what forward returns is what the model declares
    batch = batch_of(methanol(), skewed_box())
    out = model(batch)
    assert out.energy.shape == (2,) and bool(torch.isfinite(out.energy).all())
    assert (out.forces is not None) == model.has_direct_forces
    if out.forces is not None:
        assert out.forces.shape == (batch.num_atoms, 3) and bool(torch.isfinite(out.forces).all())
    assert (out.stress is not None) == model.has_direct_stress
    if out.stress is not None:
        assert out.stress.shape == (2, 6)
    assert (out.node_features is not None) == model.has_node_features
    if out.node_features is not None:
        assert out.node_features.dim() == 2 and out.node_features.shape[0] == batch.num_atoms
        assert out.node_features.shape[1] > 0
    assert (out.confidence_logits is not None) == model.has_confidence
    if out.confidence_logits is not None:
        assert out.confidence_logits.shape == (batch.num_atoms, len(edges) - 1)


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_conservative_forces_equal_finite_differences(kind, structure):
    atoms = STRUCTURES[structure]()
    batch = batch_of(atoms)
    forces = evaluate(kind.model, batch).forces_conservative.detach()
    assert forces.shape == (len(atoms), 3)
    rng = np.random.default_rng(0)
    for atom in rng.choice(len(atoms), size=3, replace=False):
        for axis in range(3):
            values = []
            for sign in (1, -1):
                positions = batch.positions.clone()
                positions[atom, axis] += sign * H
                values.append(energy(kind.model, batch.replace(positions=positions)))
            fd = -(values[0] - values[1]) / (2 * H)
            assert float(forces[atom, axis]) == pytest.approx(fd, abs=1e-6 * max(1.0, abs(fd))), (atom, axis)


def test_virial_stress_equals_finite_differences_of_a_strain(kind):
    batch = batch_of(skewed_box())
    stress = evaluate(kind.model, batch, stress=True).stress_virial.detach()[0]
    volume = float(torch.linalg.det(batch.cell[0]).abs())
    for k, (a, b) in enumerate(VOIGT):
        values = []
        for sign in (1, -1):
            strain = torch.eye(3, dtype=torch.float64)  # symmetric strain eps_ab = eps_ba = h / 2 (h on the diagonal)
            strain[a, b] += sign * H / (1 if a == b else 2)
            strain[b, a] += 0 if a == b else sign * H / 2
            values.append(energy(kind.model, batch.replace(positions=batch.positions @ strain, cell=batch.cell @ strain)))
        fd = (values[0] - values[1]) / (2 * H) / volume
        assert float(stress[k]) == pytest.approx(fd, abs=1e-7 * max(1.0, abs(fd))), k


def test_virial_stress_is_zero_for_a_molecule(kind):
    prediction = evaluate(kind.model, batch_of(methanol()), stress=True)
    assert bool((prediction.stress_virial == 0).all()) and not bool(prediction.periodic[0])


def _compare(a: Prediction, b: Prediction, atol: float = 1e-9) -> None:
    """Every tensor two predictions of the same structures share, equal within atol."""
    for name, value in a.__dict__.items():
        other = getattr(b, name)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(value.detach(), other.detach(), rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_translation_invariance(kind, structure):
    atoms = STRUCTURES[structure]()
    moved = atoms.copy()
    moved.positions += np.array([0.37, -1.3, 2.9])
    a, b = (evaluate(kind.model, batch_of(x), stress=True) for x in (atoms, moved))
    _compare(a, b, atol=1e-8)


def test_a_batch_equals_its_structures_one_by_one(kind):
    structures = [methanol(), skewed_box(), molecule("H2O")]
    batch = batch_of(*structures)
    together = evaluate(kind.model, batch, stress=True, rotational=True)
    ptr = batch.ptr.tolist()
    for b, atoms in enumerate(structures):
        alone = evaluate(kind.model, batch_of(atoms), stress=True, rotational=True)
        part = Prediction(**{
            name: (value[ptr[b]:ptr[b + 1]] if value.shape[0] == batch.num_atoms else value[b:b + 1])
            if isinstance(value, torch.Tensor) else value
            for name, value in together.__dict__.items()
        })
        _compare(part, alone)


def test_second_derivatives_exist_exactly_when_declared(kind):
    batch = batch_of(methanol())
    if not kind.model.differentiable:
        with pytest.raises(ValueError, match="no second derivatives"):
            evaluate(kind.model, batch, create_graph=True)
        return
    positions = batch.positions.clone().requires_grad_(True)
    prediction = evaluate(kind.model, batch.replace(positions=positions), create_graph=True)
    (hessian_row,) = torch.autograd.grad(prediction.forces_conservative[0, 0], positions)
    assert bool(torch.isfinite(hessian_row).all()) and float(hessian_row.abs().sum()) > 0


def test_save_load_round_trip(kind, tmp_path):
    if kind.round_trip is None:
        pytest.skip("this model kind has no file format")
    batch = batch_of(methanol(), skewed_box())
    loaded = kind.round_trip(kind.model, tmp_path)
    assert isinstance(loaded, AtomisticModel) and loaded.source
    _compare(evaluate(kind.model, batch, stress=True), evaluate(loaded, batch, stress=True), atol=1e-12)
    for flag in ("has_direct_forces", "has_direct_stress", "has_confidence", "has_node_features", "cutoff"):
        assert getattr(loaded, flag) == getattr(kind.model, flag), flag

"""Orb-v3 / Orb-v2 through the orb-models adapter, against orb-models' own calculator and API.

The protocol checks (finite differences, translation, batching, round trip) are in test_conformance.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.io import read, write
from typer.testing import CliRunner

pytest.importorskip(
    "orb_models", reason="orb-models is not installed (pip install 'atomuq[orb]')"
)

from atomuq.cli.main import app
from atomuq.core.batch import Batch
from atomuq.core.errors import InputError, ModelFileError
from atomuq.models.adapters.orb import infer_architecture, load_orb, save_orb
from atomuq.models.derivatives import evaluate
from atomuq.models.registry import resolve_model
from atomuq.uq.confidence import bin_centres, confidence
from atomuq.uq.force_delta import force_delta
from model_kinds import ORB_SMALL as SMALL
from model_kinds import molecule_and_silicon, orb_atoms_adapter, orb_calculator, small_orb


@pytest.fixture(scope="module")
def direct():
    return small_orb()


def orb_results(model, atoms):
    """orb-models' own calculator's results for the network inside an atomuq OrbModel."""
    atoms = atoms.copy()
    atoms.calc = orb_calculator(model)
    atoms.get_potential_energy()
    return atoms.calc.results


def test_direct_forces_energy_confidence_equal_orbs_calculator(direct):
    atoms = molecule_and_silicon()
    batch = Batch.from_atoms(atoms)
    pred = evaluate(direct, batch, conservative=False).detach()
    for k, a in enumerate(atoms):
        ref = orb_results(direct, a)
        assert float(pred.energy[k]) == pytest.approx(float(ref["energy"]), abs=1e-4)
        np.testing.assert_allclose(
            batch.split(pred.forces_direct)[k].detach().numpy(),
            ref["forces"],
            atol=1e-5,
        )
        probs = (
            torch.softmax(batch.split(pred.confidence_logits)[k], -1).detach().numpy()
        )
        np.testing.assert_allclose(probs, ref["confidence"], atol=1e-6)
    np.testing.assert_allclose(
        pred.stress_direct[1].detach().numpy(),
        orb_results(direct, atoms[1])["stress"],
        atol=1e-5,
    )
    assert torch.equal(
        pred.stress_direct[0], torch.zeros(6)
    )  # molecule: orb's stress (÷ volume 0) is undefined


def test_force_delta_equals_manual_computation_with_orbs_api(direct):
    to_graph = orb_atoms_adapter(direct)
    for atoms in molecule_and_silicon():
        graph = to_graph(atoms)
        vectors, _, _ = graph.compute_differentiable_edge_vectors(
            use_stress_displacement=False, use_rotation=False
        )
        graph.edge_features["vectors"] = vectors
        out = direct.orb.predict(graph)
        f_c = -torch.autograd.grad(out["energy"].sum(), graph.positions)[0]
        u = torch.linalg.norm(out["forces"] - f_c, dim=-1).detach()
        expected = float(torch.sqrt((u**2).sum() / (3 * len(atoms))))
        batch = Batch.from_atoms([atoms])
        result = force_delta(evaluate(direct, batch, conservative=True), batch)
        np.testing.assert_allclose(
            result.per_atom["force_delta"].detach().numpy(), u.numpy(), atol=1e-5
        )
        assert float(result.per_structure["force_delta"][0]) == pytest.approx(
            expected, rel=1e-4
        )


def test_node_features_and_confidence_error(direct):
    atoms = molecule_and_silicon()
    batch = Batch.from_atoms(atoms)
    pred = evaluate(direct, batch, conservative=False)
    assert pred.node_features.shape == (batch.num_atoms, SMALL["latent_dim"])
    edges = direct.confidence_bin_edges
    assert edges.shape == (51,) and float(edges[-1]) == pytest.approx(0.3)
    conf = confidence(pred.confidence_logits, edges, batch)
    expected = torch.softmax(pred.confidence_logits, -1) @ bin_centres(edges)
    torch.testing.assert_close(conf.per_atom["confidence_error"], expected)
    assert bool(((expected > 0) & (expected < 0.3)).all())


def test_conservative_orb_matches_its_own_gradients():
    model = small_orb("orb-v3-conservative", seed=3)
    assert not model.has_direct_forces and model.has_confidence
    atoms = molecule_and_silicon()[1]
    batch = Batch.from_atoms([atoms])
    pred = evaluate(model, batch, conservative=True, stress=True, rotational=True)
    ref = orb_results(model, atoms)
    np.testing.assert_allclose(
        pred.forces_conservative.detach().numpy(), ref["forces"], atol=1e-5
    )
    np.testing.assert_allclose(
        pred.stress_virial[0].detach().numpy(), ref["stress"], atol=1e-6
    )
    np.testing.assert_allclose(
        pred.rotational_gradient[0].detach().numpy(),
        ref["rotational_grad"][0],
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="conservative-only"):
        force_delta(pred, batch)


def test_orb_v2_architecture_runs_with_256_features():
    model = small_orb("orb-v2")
    batch = Batch.from_atoms(molecule_and_silicon())
    pred = evaluate(model, batch, conservative=True)
    assert pred.node_features.shape == (batch.num_atoms, 256)
    assert pred.confidence_logits is None and pred.forces_direct.shape == (
        batch.num_atoms,
        3,
    )


def test_save_load_round_trip(direct, tmp_path):
    batch = Batch.from_atoms(molecule_and_silicon())
    before = evaluate(direct, batch, conservative=True)
    path = save_orb(direct, tmp_path / "small-orb.pt")
    loaded = resolve_model(f"orb:{path}")
    after = evaluate(loaded, batch, conservative=True)
    torch.testing.assert_close(
        after.forces_direct, before.forces_direct, rtol=0, atol=0
    )
    torch.testing.assert_close(
        after.forces_conservative, before.forces_conservative, rtol=0, atol=0
    )
    raw = (
        tmp_path / "raw.ckpt"
    )  # a bare orb state dict, as orb-models publishes weights
    torch.save(direct.orb.state_dict(), raw)
    again = load_orb(raw, "orb-v3-direct", architecture_kwargs=SMALL)
    torch.testing.assert_close(again(batch).energy, before.energy, rtol=0, atol=0)


def test_weights_file_errors(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        resolve_model(f"orb:{tmp_path / 'missing.ckpt'}")
    raw = tmp_path / "mystery.ckpt"
    torch.save(small_orb().orb.state_dict(), raw)
    with pytest.raises(ModelFileError, match="cannot tell the orb architecture"):
        load_orb(raw)
    with pytest.raises(ModelFileError, match="do not match"):
        load_orb(raw, "orb-v3-direct", architecture_kwargs={**SMALL, "latent_dim": 16})
    assert (
        infer_architecture(tmp_path / "orb-v3-direct-20-omat-20250404.ckpt")
        == "orb-v3-direct-20-omat"
    )
    assert (
        infer_architecture(tmp_path / "orb-v3-conservative-inf-mpa-20250404.ckpt")
        == "orb-v3-conservative-inf-mpa"
    )


def test_partially_periodic_structure_is_refused(direct):
    slab = bulk("Si", "diamond", a=5.43, cubic=True)
    slab.pbc = (True, True, False)
    with pytest.raises(InputError, match="periodic along some axes"):
        direct(Batch.from_atoms([slab]))


def test_cli_score_with_orb_spec(direct, tmp_path):
    path = save_orb(direct, tmp_path / "small-orb.pt")
    src, out = tmp_path / "in.extxyz", tmp_path / "out.extxyz"
    write(src, molecule_and_silicon())
    result = CliRunner().invoke(
        app, ["score", str(src), "-o", str(out), "--model", f"orb:{path}"]
    )
    assert result.exit_code == 0, result.output
    scored = read(out, ":")
    assert len(scored) == 2 and all(a.info["force_delta"] > 0 for a in scored)
    assert all(0 < a.info["confidence_error"] < 0.3 for a in scored)


def test_md_with_direct_forces_and_a_force_delta_monitor(direct):
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from atomuq.calculator import AtomuqCalculator

    atoms = molecule_and_silicon()[0]
    atoms.calc = AtomuqCalculator(direct, forces="direct")
    monitor = []
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn.attach(lambda: monitor.append(atoms.calc.results["force_delta"]), interval=1)
    dyn.run(5)
    assert len(monitor) == 6 and all(np.isfinite(monitor)) and min(monitor) > 0
    np.testing.assert_array_equal(
        atoms.get_forces(), atoms.calc.results["forces_direct"]
    )


def test_ltau_and_ensembles_work_through_the_orb_adapter():
    """Orb node features drive LTAU (a training atom finds itself); Orb members form an ensemble."""
    from atomuq.models.checkpoint import weights_fingerprint
    from atomuq.uq.ensemble import ensemble_uncertainty, evaluate_ensemble
    from atomuq.uq.ltau.estimator import fit_estimator
    from atomuq.uq.ltau.index import build_index
    from atomuq.workflows.ltau import compute_descriptors

    orb_a, orb_b = small_orb(seed=0), small_orb(seed=1)
    atoms = molecule_and_silicon()
    descriptors = compute_descriptors(orb_a, atoms)
    n = sum(len(a) for a in atoms)
    assert descriptors.shape == (n, SMALL["latent_dim"])
    errors = np.random.default_rng(0).lognormal(-2, 0.5, (10, n))
    numbers = np.concatenate([a.numbers for a in atoms])
    est = fit_estimator([errors], numbers, np.ones(n), build_index(descriptors), atol=0.15,
                        metadata={"model_fingerprint": weights_fingerprint(orb_a)})
    pred = est.predict(descriptors, k=1)
    assert np.allclose(pred.confidence, (errors <= 0.15).mean(axis=0))
    est.check_model(weights_fingerprint(orb_a), "orb a")
    with pytest.raises(InputError, match="fingerprint"):
        est.check_model(weights_fingerprint(orb_b), "orb b")
    batch = Batch.from_atoms(atoms)
    ens = evaluate_ensemble([orb_a, orb_b], batch)
    forces = np.stack([evaluate(m, batch, conservative=False).forces_direct.detach().numpy() for m in (orb_a, orb_b)])
    std = ensemble_uncertainty(ens, batch).per_atom["ensemble_std"].numpy()
    assert np.allclose(std, np.sqrt(forces.var(axis=0).sum(-1) / 3.0), atol=1e-6)


def test_monitored_md_runs_on_an_orb_model(tmp_path):
    from atomuq.workflows.md.monitors import parse_monitor
    from atomuq.workflows.md.run import MDRun, MDSettings, init_velocities

    atoms = molecule("CH3CH2OH")
    init_velocities(atoms, 300.0, 0)
    monitors = [parse_monitor("force_delta,every=2"), parse_monitor("key:confidence_error,reduce=max,every=2")]
    result = MDRun(atoms, small_orb(), MDSettings(steps=8, traj_every=2), tmp_path / "orb.extxyz", monitors,
                   say=lambda m: None).run()
    assert result.status == "completed" and result.frames_written >= 4
    frames = read(tmp_path / "orb.extxyz", ":")
    assert len(frames) == result.frames_written
    log = (tmp_path / "orb.extxyz.log").read_text()
    assert "force_delta" in log and "confidence_error" in log


def test_charge_and_spin_reach_a_conditioned_orb_model(direct, tmp_path):
    """Orb-v3 OMol-style conditioning: load_orb's charge and spin give orb's own results for atoms.info charge/spin
    (orb-models 0.5 reads total_spin, 0.7 spin_multiplicity: the adapter sets both)."""
    from atomuq.models.adapters.orb import new_orb_model

    torch.manual_seed(4)
    path = save_orb(new_orb_model("orb-v3-direct", **SMALL, has_charge_spin_cond=True), tmp_path / "omol.pt")
    atoms = molecule_and_silicon()[0]
    batch = Batch.from_atoms([atoms])
    energies = []
    for charge, spin in ((0, 1), (1, 2)):
        model = load_orb(path, charge=charge, spin=spin)
        assert model.needs_charge_spin
        pred = evaluate(model, batch, conservative=False)
        labelled = atoms.copy()
        labelled.info.update(charge=charge, spin=spin)
        ref = orb_results(model, labelled)
        assert float(pred.energy[0]) == pytest.approx(float(ref["energy"]), abs=1e-4)
        np.testing.assert_allclose(pred.forces_direct.detach().numpy(), ref["forces"], atol=1e-5)
        energies.append(float(pred.energy[0]))
    assert abs(energies[1] - energies[0]) > 1e-3  # the conditioning is read, not ignored


def test_released_model_file_loads_through_orbs_own_loader(tmp_path):
    """A file named after a released model (random weights of its architecture) goes through orb's loader: the
    release's graph settings (0.5: on the model, 0.7: on the atoms adapter the loader returns) and orb's results."""
    from orb_models.forcefield.pretrained import orb_v3_direct_architecture

    torch.manual_seed(5)
    path = tmp_path / "orb-v3-direct-20-omat-20250404.ckpt"
    torch.save(orb_v3_direct_architecture(device="cpu").state_dict(), path)
    model = resolve_model(f"orb:{path}")
    assert (model.architecture, model.cutoff, model.max_num_neighbors) == ("orb-v3-direct-20-omat", 6.0, 20)
    assert model.has_direct_forces and not any(p.requires_grad for p in model.parameters())
    atoms = molecule_and_silicon()[0]
    pred = evaluate(model, Batch.from_atoms([atoms]), conservative=False)
    ref = orb_results(model, atoms)
    assert float(pred.energy[0]) == pytest.approx(float(ref["energy"]), abs=1e-3)
    np.testing.assert_allclose(pred.forces_direct.detach().numpy(), ref["forces"], atol=1e-4)


def test_orb_models_with_learned_electrostatics_are_refused():
    """orb-models >= 0.6 only: a Coulomb module and latent-charge head (OrbMol-v2) is refused with a clear error."""
    from packaging.version import Version

    from atomuq.models.adapters.orb import OrbModel, orb_api

    if Version(orb_api().version) < Version("0.6"):
        pytest.skip(f"orb-models {orb_api().version} has no electrostatics (0.6 and later)")
    from orb_models.forcefield.pretrained import orb_v3_conservative_architecture

    orb = orb_v3_conservative_architecture(**SMALL, has_electrostatics=True, device="cpu")
    with pytest.raises(ModelFileError, match="Coulomb module or latent charges are not supported"):
        OrbModel(orb, 6.0, 20, "orb-v3-conservative")

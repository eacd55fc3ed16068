"""LTAU-FF: FAISS search, estimator files, calibration, bad input, CLI (the formulas: test_formulas_ltau.py).

The end-to-end part trains the tiny model of configs/train_tiny.toml for a few epochs on EMT data
(seconds) and fits, scores and calibrates an estimator from its real error log.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.io import read, write
from conftest import emt_structures
from typer.testing import CliRunner

from atomuq.cli.main import app
from atomuq.core.errors import InputError
from atomuq.core.io import read_structures
from atomuq.models.checkpoint import load_model, weights_fingerprint
from atomuq.uq.ltau.calibration import brier_score, fit_scale, reliability_curve
from atomuq.uq.ltau.distribution import DEFAULT_EDGES, sample_confidence
from atomuq.uq.ltau.estimator import LTAUEstimator, fit_estimator
from atomuq.uq.ltau.index import build_index, measure_recall
from atomuq.uq.ltau.reweight import loss_weights
from atomuq.workflows.error_log import compact_error_log
from atomuq.workflows.ltau import compute_descriptors, fit_from_logs, load_runs, predict_records
from atomuq.workflows.train import TrainConfig, train_model

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


# ---------------------------------------------------------------- nearest neighbours


def test_faiss_exact_index_matches_brute_force_numpy():
    rng = np.random.default_rng(2)
    data = rng.normal(size=(500, 12)).astype(np.float32)
    queries = rng.normal(size=(40, 12)).astype(np.float32)
    index = build_index(data, "flat")
    dist, ids = index.search(queries, 5)
    d2 = ((queries[:, None, :].astype(np.float64) - data[None, :, :]) ** 2).sum(-1)
    brute_ids = np.argsort(d2, axis=1)[:, :5]
    assert np.array_equal(ids, brute_ids)
    assert np.allclose(dist, np.sqrt(np.take_along_axis(d2, brute_ids, axis=1)), rtol=1e-4)


@pytest.mark.parametrize("kind, params", [("hnsw", {"ef_search": 64}), ("ivf", {"nlist": 16, "nprobe": 16})])
def test_approximate_indexes_report_recall_measured_against_brute_force(kind, params):
    rng = np.random.default_rng(3)
    data = rng.normal(size=(2000, 8)).astype(np.float32)
    index = build_index(data, kind, params, recall_queries=200, recall_k=5)
    assert index.recall is not None and 0.9 <= index.recall <= 1.0  # nprobe = nlist is exhaustive for IVF
    queries = data[:50]
    d2 = ((queries[:, None, :] - data[None]) ** 2).sum(-1)
    exact = np.argsort(d2, axis=1)[:, :5]
    _, found = index.search(queries, 5)
    brute_recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found, exact)])
    assert measure_recall(index, data, queries, 5) == pytest.approx(brute_recall)


def test_index_rejects_bad_descriptors_and_parameters():
    data = np.random.default_rng(4).normal(size=(30, 6))
    index = build_index(data)
    with pytest.raises(InputError, match="width 5 cannot be searched in an index of width 6"):
        index.search(np.zeros((2, 5)), 1)
    with pytest.raises(InputError, match="k = 31"):
        index.search(np.zeros((2, 6)), 31)
    with pytest.raises(InputError, match="NaN"):
        build_index(np.full((4, 6), np.nan))
    with pytest.raises(InputError, match="unknown hnsw index parameters"):
        build_index(data, "hnsw", {"efsearch": 3})


# ---------------------------------------------------------------- estimator


def _synthetic_estimator(n=400, d=6, seed=5) -> tuple[LTAUEstimator, list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    descriptors = rng.normal(size=(n, d)).astype(np.float32)
    scale = np.exp(descriptors[:, 0])  # errors grow along one descriptor direction
    runs = [rng.lognormal(-3, 0.5, (e, n)) * scale for e in (25, 25)]
    numbers = rng.choice([1, 6, 8], size=n)
    est = fit_estimator(runs, numbers, np.abs(rng.normal(size=n)), build_index(descriptors), atol=0.05,
                        metadata={"model_fingerprint": "abc", "model": "synthetic"})
    return est, runs, descriptors


def test_estimator_predicts_neighbour_averages_and_round_trips(tmp_path):
    est, runs, descriptors = _synthetic_estimator()
    pred = est.predict(descriptors[:20], k=3)
    p_train = np.mean([sample_confidence(r, 0.05) for r in runs], axis=0)
    assert np.allclose(pred.confidence, p_train[pred.neighbours].mean(axis=1))
    assert np.allclose(pred.uncertainty, 1 - pred.confidence)
    self_pred = est.predict(descriptors[:20], k=1)  # a training atom's own nearest neighbour is itself
    assert np.array_equal(self_pred.neighbours[:, 0], np.arange(20))
    assert np.allclose(self_pred.distance, 0.0, atol=1e-3)
    exact_mean = np.mean([r.mean(axis=0) for r in runs], axis=0)[:20]
    assert np.all(np.abs(self_pred.expected_error / exact_mean - 1) <= est.bins.resolution - 1)
    path = est.save(tmp_path / "est.npz")
    loaded = LTAUEstimator.load(path)
    again = loaded.predict(descriptors[:20], k=3)
    for name, values in pred.per_atom.items():
        assert np.array_equal(values, again.per_atom[name])
    assert loaded.metadata["model_fingerprint"] == "abc" and loaded.atol == 0.05
    # another tolerance read from the histograms equals the exact count at a bin edge
    edge = float(DEFAULT_EDGES[55])
    assert np.allclose(loaded.training_confidence(edge), np.mean([sample_confidence(r, edge) for r in runs], axis=0))


def test_estimator_file_errors_name_the_file(tmp_path):
    est, _, _ = _synthetic_estimator(n=50)
    path = est.save(tmp_path / "est.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated.npz: unreadable LTAU estimator"):
        LTAUEstimator.load(truncated)
    with pytest.raises(InputError, match="missing.npz: LTAU estimator file not found"):
        LTAUEstimator.load(tmp_path / "missing.npz")
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(InputError, match="other.npz: not a complete LTAU estimator"):
        LTAUEstimator.load(other)
    with pytest.raises(InputError, match="fingerprint"):
        est.check_model("ffff", "model.pt")
    with pytest.raises(InputError, match=r"est.npz: fitted on descriptors of width 6, got width 5"):
        LTAUEstimator.load(path).predict(np.zeros((3, 5)), k=1)
    with pytest.raises(InputError, match=r"molecule 3: elements \[7\] never occur"):
        est.check_elements(np.array([1, 7, 6]), "molecule 3")


# ---------------------------------------------------------------- calibration


def test_probabilities_that_generate_the_outcomes_are_calibrated():
    rng = np.random.default_rng(6)
    p = rng.uniform(size=200_000)
    hits = rng.uniform(size=p.size) < p
    curve = reliability_curve(p, hits, n_bins=10)
    assert curve.miscalibration_area < 0.01
    assert np.allclose(curve.observed, curve.predicted, atol=0.02)
    assert brier_score(p, hits) == pytest.approx(np.mean(p * (1 - p)), abs=0.005)  # E[(p - Bernoulli(p))²]
    biased = reliability_curve(np.clip(p * 0.5, 0, 1), hits, 10)  # under-confident probabilities
    assert biased.miscalibration_area > 0.2


def test_fitted_scale_recovers_the_scale_that_generated_the_errors():
    rng = np.random.default_rng(7)
    p = rng.uniform(0.02, 0.98, size=50_000)
    u = rng.uniform(size=p.size)
    atol, s_true = 0.1, 3.0
    errors = s_true * atol * (u / p)  # error <= s_true·atol exactly when u <= p
    fit = fit_scale(p, errors, atol)
    assert fit.scale == pytest.approx(s_true, rel=0.05)
    assert fit.area_after < 0.01 < fit.area_before
    with pytest.raises(InputError, match="NaN"):
        fit_scale(p, np.full(p.size, np.nan), atol)


def test_reweighting_follows_the_paper_formulas():
    mu, sigma = np.array([0.1, 0.5, 0.9]), np.array([0.0, 0.2, 0.05])
    hard = loss_weights(mu, sigma, "hard", 4.5)
    easy = loss_weights(mu, sigma, "easy", 2.0)
    expect_hard = np.exp(4.5 * (1 - mu + sigma))
    expect_easy = np.exp(2.0 * (mu + sigma))
    assert np.allclose(hard, expect_hard / expect_hard.mean())
    assert np.allclose(easy, expect_easy / expect_easy.mean())
    assert hard.mean() == pytest.approx(1.0)
    with pytest.raises(InputError, match="scheme"):
        loss_weights(mu, sigma, "medium", 1.0)


# ---------------------------------------------------------------- end to end on a real (tiny) training run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny model trained 3 epochs on EMT data, twice (two seeds): real error logs for LTAU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("ltau")
    write(folder / "tiny_train.extxyz", emt_structures(0, n_cells=6, n_molecules=6))
    write(folder / "tiny_val.extxyz", emt_structures(1, n_cells=3, n_molecules=3))
    shutil.copy(ROOT / "configs" / "train_tiny.toml", folder / "tiny.toml")
    config = TrainConfig.from_toml(folder / "tiny.toml")
    runs = []
    for seed in (0, 1):
        run = dataclasses.replace(config, run_dir=folder / f"run{seed}", seed=seed, epochs=3)
        train_model(run)
        runs.append(run.run_dir)
    torch.set_num_threads(threads)
    return folder, runs


def test_fit_from_real_logs_uses_the_logged_training_atoms(trained):
    folder, runs = trained
    model = load_model(runs[0] / "best.pt")
    est = fit_from_logs([r / "error_log" for r in runs], model, [folder / "tiny_train.extxyz"], atol=0.2)
    trajectories, logs = load_runs([r / "error_log" for r in runs])
    assert est.n_atoms == logs[0].n_atoms and est.metadata["n_runs"] == 2
    assert np.allclose(est.confidence, np.mean([sample_confidence(t.errors, 0.2) for t in trajectories], axis=0))
    # each training atom's descriptor finds itself
    structures = read(folder / "tiny_train.extxyz", ":")
    descriptors = compute_descriptors(model, structures)
    pred = est.predict(descriptors, k=1)
    assert np.allclose(pred.confidence, est.confidence)
    with pytest.raises(InputError, match="no --train file has that content"):
        fit_from_logs([runs[0] / "error_log"], model, [folder / "tiny_val.extxyz"])


def test_fit_from_compact_logs_equals_the_full_logs_at_the_default_atol(trained, tmp_path):
    folder, runs = trained
    model = load_model(runs[0] / "best.pt")
    train = [folder / "tiny_train.extxyz"]
    full = [r / "error_log" for r in runs]
    compact = [compact_error_log(log, tmp_path / f"compact{i}", skip_epochs=1).directory for i, log in enumerate(full)]
    # one run: its default atol (the mean final-epoch error) is an edge of its compact log
    exact = fit_from_logs(full[:1], model, train, skip_epochs=1)
    binned = fit_from_logs(compact[:1], model, train)  # the epochs the compact log holds: 2-3
    assert binned.atol == exact.atol and np.allclose(binned.confidence, exact.confidence, atol=1e-12)
    # two runs at a power of ten (an edge of every compact log): μ_M and σ_M exact
    exact = fit_from_logs(full, model, train, skip_epochs=1, atol=0.1)
    binned = fit_from_logs(compact, model, train, atol=0.1)
    assert binned.metadata["epochs_per_run"] == [2, 2]
    assert np.allclose(binned.confidence, exact.confidence, atol=1e-12)
    assert np.allclose(binned.spread, exact.spread, atol=1e-12)
    assert [r["form"] for r in binned.metadata["runs"]] == ["histogram"] * 2
    assert [r["epochs"] for r in binned.metadata["runs"]] == [[2, 3]] * 2
    with pytest.raises(InputError, match="holding epochs 2-3 only"):
        fit_from_logs(compact, model, train, skip_epochs=0)
    out = tmp_path / "est.npz"
    res = runner.invoke(app, ["ltau", "fit", "--logs", str(compact[0]), "--train", str(train[0]),
                              "-m", str(runs[0] / "best.pt"), "-o", str(out), "--skip-epochs", "2"])
    assert res.exit_code == 1 and "--skip-epochs 1" in res.output and not out.exists()
    assert binned.metadata["confidence_read_out"] == "exact"
    res = runner.invoke(app, ["ltau", "fit", "--logs", str(compact[0]), "--train", str(train[0]),
                              "-m", str(runs[0] / "best.pt"), "-o", str(out), "--atol", "0.3"])
    assert res.exit_code == 0, res.output
    assert "interpolated: atol 0.3 eV/Å lies between the histogram edges 0.2512 and 0.3162" in " ".join(res.output.split())
    assert LTAUEstimator.load(out).metadata["runs"][0]["form"] == "histogram"


def test_fit_refuses_a_model_that_wrote_none_of_the_logs(trained, tmp_path):
    folder, runs = trained
    log, other = runs[0] / "error_log", runs[1] / "best.pt"
    with pytest.raises(InputError, match="wrote none of these logs") as info:
        fit_from_logs([log], load_model(other), [folder / "tiny_train.extxyz"])
    message = str(info.value)
    fingerprints = json.loads((log / "error_log.json").read_text())["model_fingerprints"]
    assert str(log / "error_log.json") in message and fingerprints[-1] in message
    assert str(runs[0] / "best.pt") in message and weights_fingerprint(load_model(other)) in message
    # the model of either run fits from both logs; the last epoch's weights (last.pt) are a logged epoch too
    fit_from_logs([log, runs[1] / "error_log"], load_model(other), [folder / "tiny_train.extxyz"])
    fit_from_logs([log], load_model(runs[0] / "last.pt"), [folder / "tiny_train.extxyz"])
    out = tmp_path / "est.npz"
    res = runner.invoke(app, ["ltau", "fit", "--logs", str(log), "--train", str(folder / "tiny_train.extxyz"),
                              "-m", str(other), "-o", str(out)])
    assert res.exit_code == 1 and "wrote none of these logs" in res.output and "Traceback" not in res.output
    assert str(other) in res.output and not out.exists()


def test_fit_checks_its_output_and_training_structures_before_any_work(trained, tmp_path):
    folder, runs = trained
    model = str(runs[0] / "best.pt")
    args = ["ltau", "fit", "--logs", str(runs[0] / "error_log"), "--train", str(folder / "tiny_train.extxyz"), "-m", model]
    res = runner.invoke(app, [*args, "-o", str(tmp_path)])
    assert res.exit_code == 1 and f"--output {tmp_path}: is a directory" in res.output
    res = runner.invoke(app, [*args, "-o", "/proc/atomuq-nowhere/est.npz"])
    assert res.exit_code == 1 and "--output /proc/atomuq-nowhere/est.npz: cannot write" in res.output
    with pytest.raises(InputError, match=r"tiny_train.extxyz structure 0: element\(s\) Cu not supported"):
        fit_from_logs([runs[0] / "error_log"], _Fewer(load_model(model)), [folder / "tiny_train.extxyz"])


class _Fewer(torch.nn.Module):
    """A model wrapper claiming fewer elements than the wrapped model (same weights, same fingerprint)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.elements = [z for z in model.elements if z != 29]  # no Cu

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)


def test_estimator_refuses_another_model_and_unknown_elements(trained, tmp_path):
    folder, runs = trained
    model = load_model(runs[0] / "best.pt")
    est = fit_from_logs([runs[0] / "error_log"], model, [folder / "tiny_train.extxyz"])
    records = read_structures([folder / "tiny_val.extxyz"])
    other = load_model(runs[1] / "best.pt")
    with pytest.raises(InputError, match="fingerprint"):
        predict_records(records, other, est)
    lonely = molecule("SiH4")
    write(tmp_path / "si.extxyz", lonely)
    with pytest.raises(InputError, match=r"si.extxyz structure 0: elements \[14\] never occur"):
        predict_records(read_structures([tmp_path / "si.extxyz"]), model, est)


def test_truncated_or_empty_error_logs_are_refused(trained, tmp_path):
    folder, runs = trained
    broken = tmp_path / "error_log"
    shutil.copytree(runs[0] / "error_log", broken)
    data = (broken / "errors_direct.npy").read_bytes()
    (broken / "errors_direct.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="errors_direct.npy"):
        load_runs([broken])
    empty = tmp_path / "empty_log"
    shutil.copytree(runs[0] / "error_log", empty)
    meta = json.loads((empty / "error_log.json").read_text())
    meta["n_epochs_completed"] = 0
    (empty / "error_log.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="empty"):
        load_runs([empty])


def test_cli_fit_score_calibrate_weights(trained, tmp_path):
    folder, runs = trained
    est_path, out, cal = tmp_path / "est.npz", tmp_path / "scored.extxyz", tmp_path / "cal.npz"
    model = str(runs[0] / "best.pt")
    res = runner.invoke(app, ["ltau", "fit", "--logs", str(runs[0] / "error_log"), "--logs", str(runs[1] / "error_log"),
                              "--train", str(folder / "tiny_train.extxyz"), "--model", model, "-o", str(est_path),
                              "--index", "hnsw", "--index-param", "ef_search=32"])
    assert res.exit_code == 0, res.output
    assert "recall@k" in res.output and est_path.is_file()
    res = runner.invoke(app, ["ltau", "score", str(folder / "tiny_val.extxyz"), "-e", str(est_path), "-o", str(out), "-k", "2"])
    assert res.exit_code == 0, res.output
    frames = read(out, ":")
    assert len(frames) == len(read(folder / "tiny_val.extxyz", ":"))
    for atoms in frames:
        p = atoms.arrays["ltau_confidence_atoms"]
        assert np.all((p >= 0) & (p <= 1)) and np.allclose(atoms.arrays["ltau_uncertainty_atoms"], 1 - p)
        assert atoms.info["ltau_uncertainty"] == pytest.approx(np.mean(1 - p))
        assert np.all(atoms.arrays["ltau_distance_atoms"] >= 0) and "eps_nc" in atoms.info
    res = runner.invoke(app, ["ltau", "calibrate", str(folder / "tiny_val.extxyz"), "-e", str(est_path), "-o", str(cal),
                              "--plot", str(tmp_path / "cal.png")])
    assert res.exit_code == 0, res.output
    calibrated = LTAUEstimator.load(cal)
    record = calibrated.metadata["calibration"]
    assert calibrated.calibrated and calibrated.scale == pytest.approx(record["scale"])
    assert (tmp_path / "cal.png").stat().st_size > 1000
    # the recorded areas describe what scoring gives: p of the uncalibrated estimator against error <= atol
    # (area before) and p of the calibrated one against error <= s·atol (area after), on the same atoms
    atol = calibrated.atol
    for estimator, scale, key in ((est_path, 1.0, "area_before"), (cal, calibrated.scale, "area_after")):
        rescored = tmp_path / f"rescored_{key}.extxyz"
        res = runner.invoke(app, ["ltau", "score", str(folder / "tiny_val.extxyz"), "-e", str(estimator),
                                  "-o", str(rescored)])
        assert res.exit_code == 0, res.output
        frames = read(rescored, ":")
        p = np.concatenate([a.arrays["ltau_confidence_atoms"] for a in frames])
        errors = np.concatenate([a.arrays["eps_nc_atoms"] for a in frames])
        assert reliability_curve(p, errors <= scale * atol, 10).miscalibration_area == pytest.approx(record[key],
                                                                                                    abs=1e-6)
    res = runner.invoke(app, ["ltau", "calibrate", str(folder / "tiny_val.extxyz"), "-e", str(cal), "-o", str(cal)])
    assert res.exit_code == 1 and "already calibrated" in res.output
    # a fitted scale of exactly 1 is still a calibration: refused again, not taken for an uncalibrated file
    unit = tmp_path / "unit.npz"
    LTAUEstimator.load(est_path).with_scale(1.0, {**record, "scale": 1.0}).save(unit)
    assert LTAUEstimator.load(unit).calibrated and not LTAUEstimator.load(est_path).calibrated
    res = runner.invoke(app, ["ltau", "calibrate", str(folder / "tiny_val.extxyz"), "-e", str(unit), "-o",
                              str(tmp_path / "again.npz")])
    assert res.exit_code == 1 and "already calibrated (s = 1)" in res.output
    res = runner.invoke(app, ["ltau", "weights", "-e", str(est_path), "--scheme", "hard", "--lambda", "4.5",
                              "-o", str(tmp_path / "w.npy")])
    assert res.exit_code == 0, res.output
    w = np.load(tmp_path / "w.npy")
    assert len(w) == calibrated.n_atoms and w.mean() == pytest.approx(1.0, rel=1e-5)
    res = runner.invoke(app, ["ltau", "score", str(folder / "tiny_val.extxyz"), "-e", str(tmp_path / "nope.npz"),
                              "-o", str(out)])
    assert res.exit_code == 1 and "nope.npz: LTAU estimator file not found" in res.output


def test_score_and_ltau_score_keep_each_others_results(trained, tmp_path):
    folder, runs = trained
    model, est_path = str(runs[0] / "best.pt"), tmp_path / "est.npz"
    assert runner.invoke(app, ["ltau", "fit", "--logs", str(runs[0] / "error_log"), "--train",
                               str(folder / "tiny_train.extxyz"), "--model", model, "-o", str(est_path)]).exit_code == 0
    scored, both, again = tmp_path / "s.extxyz", tmp_path / "sl.extxyz", tmp_path / "sls.extxyz"
    res = runner.invoke(app, ["score", str(folder / "tiny_val.extxyz"), "-m", model, "-o", str(scored)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["ltau", "score", str(scored), "-e", str(est_path), "-o", str(both)])
    assert res.exit_code == 0, res.output
    assert "kept the `atomuq score` results (same model) on 6 of 6 structures" in res.output
    res = runner.invoke(app, ["score", str(both), "-m", model, "-o", str(again)])
    assert res.exit_code == 0, res.output
    assert "replaced the earlier `atomuq score` results on 6 of 6" in res.output and "kept the `atomuq ltau score`" in res.output
    for first, last in zip(read(scored, ":"), read(again, ":")):
        assert last.info["force_delta"] == pytest.approx(first.info["force_delta"])
        assert "ltau_uncertainty" in last.info and "ltau_uncertainty_atoms" in last.arrays
        assert last.info["atomuq_model_fingerprint"] == first.info["atomuq_model_fingerprint"]


def test_ase_calculator_gives_the_same_ltau_as_the_workflow(trained):
    from atomuq.calculator import AtomuqCalculator

    folder, runs = trained
    model = load_model(runs[0] / "best.pt")
    est = fit_from_logs([runs[0] / "error_log"], model, [folder / "tiny_train.extxyz"])
    records = read_structures([folder / "tiny_val.extxyz"])
    scored = predict_records(records[:1], model, est, k=2)
    atoms = records[0].atoms.copy()
    atoms.calc = AtomuqCalculator(model, ltau=est, ltau_k=2)
    for name, values in scored.prediction.per_atom.items():
        assert np.allclose(atoms.calc.get_property(name + "_atoms", atoms), values, rtol=1e-5, atol=1e-6)
    for name, values in scored.prediction.per_structure.items():
        assert atoms.calc.get_property(name, atoms) == pytest.approx(values[0], rel=1e-5)
    assert atoms.calc.get_property("ltau_uncertainty", atoms) == pytest.approx(scored.prediction.uncertainty.mean())
    with pytest.raises(InputError, match="fingerprint"):
        AtomuqCalculator(load_model(runs[1] / "best.pt"), ltau=est)


def test_weighted_force_loss_scales_each_atom():
    from atomuq.workflows.losses import forces_loss

    rng = np.random.default_rng(8)
    forces = torch.tensor(rng.normal(size=(5, 3)), requires_grad=True)
    target = torch.tensor(rng.normal(size=(5, 3)))
    assert forces_loss(forces, target, 0.01, torch.ones(5)).item() == pytest.approx(forces_loss(forces, target, 0.01).item())
    weights = torch.tensor([0.0, 1.0, 2.0, 1.0, 1.0])
    forces_loss(forces, target, 0.01, weights).backward()
    assert torch.all(forces.grad[0] == 0)
    unweighted = torch.autograd.grad(forces_loss(forces, target, 0.01), forces)[0]
    assert torch.allclose(forces.grad, unweighted * weights[:, None])


def test_training_with_ltau_weights_and_bad_weights(trained, tmp_path):
    folder, runs = trained
    est = fit_from_logs([runs[0] / "error_log"], load_model(runs[0] / "best.pt"), [folder / "tiny_train.extxyz"])
    weights = loss_weights(est.confidence, est.spread, "hard", 4.5)
    np.save(tmp_path / "w.npy", weights)
    config = TrainConfig.from_toml(folder / "tiny.toml")
    weighted = dataclasses.replace(config, run_dir=tmp_path / "weighted", epochs=1,
                                   data=dataclasses.replace(config.data, atom_weights=tmp_path / "w.npy"))
    result = train_model(weighted)
    assert result.epochs_completed == 1
    np.save(tmp_path / "short.npy", weights[:-1])
    bad = dataclasses.replace(weighted, run_dir=tmp_path / "bad",
                              data=dataclasses.replace(config.data, atom_weights=tmp_path / "short.npy"))
    with pytest.raises(InputError, match=rf"short.npy: \({len(weights) - 1},\) atom weights for {len(weights)} training atoms"):
        train_model(bad)


def test_cli_fit_compressed_index_with_descriptor_file(trained, tmp_path):
    """`--index ivfsq --descriptors FILE`: the descriptors land in a memory-mapped .npy (those of the model), the
    estimator loads memory-mapped and scores; the same file for both outputs is refused before any work."""
    folder, runs = trained
    est_path, desc = tmp_path / "est.npz", tmp_path / "desc.npy"
    model = str(runs[0] / "best.pt")
    base = ["ltau", "fit", "--logs", str(runs[0] / "error_log"), "--train", str(folder / "tiny_train.extxyz"),
            "--model", model, "--index", "ivfsq", "--index-param", "nprobe=4"]
    res = runner.invoke(app, [*base, "-o", str(est_path), "--descriptors", str(desc)])
    assert res.exit_code == 0, res.output
    net = load_model(model)
    train = [r.atoms for r in read_structures([folder / "tiny_train.extxyz"])]
    assert np.allclose(np.load(desc), compute_descriptors(net, train), atol=1e-5)
    estimator = LTAUEstimator.load(est_path)
    assert estimator.index.kind == "ivfsq" and estimator.index.memory_mapped and estimator.n_atoms == len(np.load(desc))
    res = runner.invoke(app, ["ltau", "score", str(folder / "tiny_val.extxyz"), "-e", str(est_path), "-o",
                              str(tmp_path / "scored.extxyz")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*base, "-o", str(est_path), "--descriptors", str(est_path)])
    assert res.exit_code == 1 and "the same file as --output" in res.output

"""atomuq bench: the report's numbers are the evaluation functions' numbers; bad input fails clearly."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from ase.io import read, write
from typer.testing import CliRunner

from atomuq.cli.main import app
from atomuq.core.errors import InputError
from atomuq.core.io import read_structures
from atomuq.models.registry import resolve_model
from atomuq.uq.evaluate import ConformalCalibrator, IsotonicMap, bootstrap_ci, ence, min_calibration_size, roc_auc, spearman, zms
from atomuq.workflows.bench import (
    BenchData,
    BenchSettings,
    bench_files,
    check_calibration_size,
    check_labelled,
    collect,
    evaluate_bench,
    fit_calibration,
)
from atomuq.workflows.score import score_records

runner = CliRunner()
DEMO = Path(str(resources.files("atomuq") / "data" / "structures" / "molecular_demo.extxyz"))


@pytest.fixture(scope="module")
def model():
    return resolve_model(None)


def synthetic(n_per_system: int = 30, seed: int = 0) -> BenchData:
    """Three systems of random scores with errors that grow with them (eV/Å), two files."""
    rng = np.random.default_rng(seed)
    n = 3 * n_per_system
    u = rng.lognormal(-1.0, 0.7, n)
    eps_nc = u * rng.lognormal(0.0, 0.4, n)
    eps_c = u * rng.lognormal(0.0, 0.1, n)
    systems = np.repeat(np.array(["a", "b", "c"]), n_per_system)
    files = np.where(np.arange(n) % 2 == 0, "even.xyz", "odd.xyz")
    components = rng.normal(0.0, 1.0, (n, 6)) * eps_nc[:, None]
    return BenchData(
        systems=systems,
        files=files,
        values={"force_delta": u, "eps_nc": eps_nc, "eps_c": eps_c},
        components={"direct": components.ravel()},
        component_structure=np.repeat(np.arange(n), 6),
    )


def test_report_numbers_are_the_evaluation_functions(tmp_path):
    data = synthetic()
    settings = BenchSettings(n_boot=50, n_bins=4, seed=3)
    report = evaluate_bench(data, settings)
    b = data.systems == "b"
    u, e_nc, e_c = (data.values[k][b] for k in ("force_delta", "eps_nc", "eps_c"))
    sys_b = report["systems"]["b"]
    assert sys_b["n"] == b.sum() == 30
    assert sys_b["spearman"]["force_delta_vs_eps_c"]["estimate"] == pytest.approx(spearman(u, e_c))
    ci = bootstrap_ci(spearman, u, e_nc, n_boot=50, seed=3)
    assert sys_b["spearman"]["force_delta_vs_eps_nc"] == pytest.approx(ci.to_dict())
    flag = sys_b["roc_auc"]["force_delta_vs_eps_nc"]
    assert flag["threshold"] == pytest.approx(np.quantile(e_nc, 0.9))
    assert flag["base_rate"] == pytest.approx(np.mean(e_nc > flag["threshold"]))
    assert flag["auc"]["estimate"] == pytest.approx(roc_auc(u, e_nc, flag["threshold"]).auc)
    raw = sys_b["calibration"]["U_Δ (raw)"]
    assert raw["n_bins"] == 4
    assert raw["ence"]["estimate"] == pytest.approx(ence(u, e_nc, n_bins=4))
    assert raw["zms"]["estimate"] == pytest.approx(zms(u, e_nc))
    # pooled group and model-averaged numbers
    assert report["all"]["n"] == len(data)
    per_system = [report["systems"][s]["spearman"]["force_delta_vs_eps_nc"]["estimate"] for s in "abc"]
    averaged = report["model_averaged"]["mean_of_system_spearman"]["force_delta_vs_eps_nc"]
    assert averaged["mean"] == pytest.approx(np.mean(per_system))
    means = [[data.values[k][data.systems == s].mean() for k in ("force_delta", "eps_nc")] for s in "abc"]
    expected = spearman(*np.array(means).T)
    assert report["model_averaged"]["spearman_of_system_means"]["force_delta_vs_eps_nc"] == pytest.approx(expected)
    json.dumps(report)  # JSON-ready


def test_calibration_and_coverage_match_direct_fits():
    cal = synthetic(seed=1)
    calibration = fit_calibration(cal, "cal.xyz", seed=5)
    assert calibration.n_map + calibration.n_conformal + len(calibration.held_back[0]) == len(cal)
    order = np.random.default_rng(5).permutation(len(cal))
    third = len(cal) // 3
    u, e = cal.values["force_delta"], cal.values["eps_nc"]
    g = IsotonicMap("rms").fit(u[order[:third]], e[order[:third]])
    direct = ConformalCalibrator(g).fit(u[order[third : 2 * third]], e[order[third : 2 * third]])
    held = order[2 * third :]
    data = synthetic(seed=2)
    report = evaluate_bench(data, BenchSettings(n_boot=20, levels=(0.8, 0.9)), calibration)
    odd = data.files == "odd.xyz"
    got = report["calibration"]["coverage"]["odd.xyz"]
    assert got["n"] == odd.sum() and not got["in_sample"]
    for level, c in zip((0.8, 0.9), got["coverage"]["g(U_Δ)"]):
        want = direct.coverage(data.values["force_delta"][odd], data.values["eps_nc"][odd], level)
        assert c == pytest.approx(want.to_dict())
    held_report = report["calibration"]["coverage"]["cal.xyz [held-back third]"]
    want = direct.coverage(u[held], e[held], 0.9).to_dict()
    assert held_report["n"] == len(held) and held_report["coverage"]["g(U_Δ)"][1] == pytest.approx(want)
    sigma = g.predict(data.values["force_delta"])
    pooled = report["all"]["calibration"]["g(U_Δ) (isotonic)"]
    assert pooled["zms"]["estimate"] == pytest.approx(zms(sigma, data.values["eps_nc"]))


def test_collect_matches_score(model):
    records = read_structures([DEMO])[:12]
    data = collect(records, model, batch_size=5)
    scored, _ = score_records(records, model)
    for key in ("force_delta", "eps_nc", "eps_c"):
        assert data.values[key] == pytest.approx([a.info[key] for a in scored])
    assert list(data.systems) == [r.atoms.info["molecule"] for r in records]
    # the signed components reproduce ε_nc: sqrt(mean over a structure's 3N components of their square)
    k = 3
    comp = data.components["direct"][data.component_structure == k]
    assert np.sqrt(np.mean(comp**2)) == pytest.approx(data.values["eps_nc"][k])


def test_unlabelled_structures_are_rejected(tmp_path, model):
    frames = read(DEMO, index=":4")
    frames[2].calc = None
    path = tmp_path / "partly.extxyz"
    write(path, frames)
    with pytest.raises(InputError, match=r"partly.extxyz structure 2: no reference forces \(1 of 4"):
        check_labelled(read_structures([path]))
    with pytest.raises(InputError, match="no reference forces"):
        bench_files([path], model)
    result = runner.invoke(app, ["bench", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "no reference forces" in result.output
    assert not (tmp_path / "out").exists()


def test_bad_settings_are_rejected():
    for bad in (BenchSettings(n_boot=5), BenchSettings(levels=(0.9, 1.0)), BenchSettings(flag_quantile=0.0)):
        with pytest.raises(InputError):
            evaluate_bench(synthetic(), bad)


@pytest.mark.parametrize("level", [0.8, 0.9, 0.95])
def test_calibration_file_needs_three_times_the_conformal_minimum(level):
    needed = 3 * min_calibration_size(level)  # its conformal third: 0.9 needs 9 there, a file of 27
    check_calibration_size(needed, (0.5, level), "cal.xyz")
    data = synthetic(needed)
    calibration = fit_calibration(data.subset(data.systems == "a"), "cal.xyz")
    bound = calibration.conformal["U_Δ"].coverage(*calibration.held_back, level)
    assert calibration.n_conformal == min_calibration_size(level) and np.isfinite(bound.mean_bound)
    with pytest.raises(InputError, match=f"cal.xyz: {needed - 1} labelled .* coverage {level:g} needs "
                                         f"{min_calibration_size(level)} there: give at least {needed} structures"):
        check_calibration_size(needed - 1, (level, 0.5), "cal.xyz")


def test_too_small_calibration_file_is_refused_before_any_scoring(model, tmp_path):
    small = tmp_path / "cal.extxyz"
    write(small, read(DEMO, ":26"))  # its third, 8, is one short of the 9 that coverage 0.9 needs
    scored = []
    with pytest.raises(InputError, match="cal.extxyz: 26 labelled structures.*give at least 27"):
        bench_files([DEMO], model, settings=BenchSettings(levels=(0.9,)), calibrate_on=small, progress=scored.append)
    assert not scored


def test_cli_writes_report(tmp_path):
    out = tmp_path / "report"
    args = [
        "bench",
        str(DEMO),
        "-o",
        str(out),
        "--bootstrap",
        "20",
        "--group-key",
        "demo_group",
        "--ensemble",
        "molecular-small,molecular-small-seed1",
        "--calibrate-on",
        str(DEMO),
        "--levels",
        "0.8",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    assert set(report["systems"]) == {"in-domain 300 K", "in-domain 1200 K", "held-out"}
    assert report["systems"]["held-out"]["n"] == 10
    assert "ensemble_std_vs_eps_ensemble" in report["all"]["spearman"]
    assert report["calibration"]["coverage"][str(DEMO)]["in_sample"]
    for name in ("bench.md", "force_delta_vs_errors.png", "ensemble_std_vs_error.png", "calibration.png", "coverage.png"):
        assert (out / name).stat().st_size > 0
    assert "r_s(U_Δ, ε_c)" in (out / "bench.md").read_text()


def test_clustered_bootstrap_resamples_whole_searches(tmp_path):
    import dataclasses

    from atomuq.core.io import Record
    from atomuq.workflows.bench import cluster_ids

    data = synthetic()
    clusters = np.arange(len(data)) // 6  # correlated runs of 6 structures
    clustered = dataclasses.replace(data, clusters=clusters)
    report = evaluate_bench(clustered, BenchSettings(n_boot=50, n_bins=4, seed=3))
    b = data.systems == "b"
    u, e_nc = data.values["force_delta"][b], data.values["eps_nc"][b]
    expected = bootstrap_ci(spearman, u, e_nc, n_boot=50, seed=3, groups=clusters[b]).to_dict()
    assert report["systems"]["b"]["spearman"]["force_delta_vs_eps_nc"] == pytest.approx(expected)
    assert expected["n"] == 5  # five searches, not thirty structures
    records = [Record(a, "f.xyz", k) for k, a in enumerate(read(DEMO, ":4"))]
    for k, r in enumerate(records):
        r.atoms.info["source_index"] = k // 2
    ids = cluster_ids(records, "molecule", "source_index")
    assert len(set(ids)) == len({(r.atoms.info.get("molecule"), r.atoms.info["source_index"]) for r in records})
    del records[3].atoms.info["source_index"]
    with pytest.raises(InputError, match="f.xyz structure 3: no info key 'source_index'"):
        cluster_ids(records, "molecule", "source_index")

"""Compact (histogram) error logs: the same p_i as the full log at every edge, log-linear in between, one reader.

A synthetic full log is written with ErrorLogWriter and compacted; the committed molecular-small log is
checked against its committed compact form.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from atomuq.cli.main import app
from atomuq.core.errors import InputError
from atomuq.uq.ltau.distribution import (
    DEFAULT_EDGES,
    BinnedErrors,
    ErrorTrajectory,
    HistogramBins,
    common_bins,
    count_dtype,
    error_histogram,
    log_edges,
    sample_confidence,
)
from atomuq.uq.ltau.estimator import fit_estimator
from atomuq.uq.ltau.index import build_index
from atomuq.workflows.error_log import HISTOGRAMS, METADATA, ErrorLogWriter, compact_error_log, load_error_log
from atomuq.workflows.ltau import load_runs

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "data" / "training" / "molecular-small"
runner = CliRunner()


def write_full_log(folder: Path, errors: dict[str, np.ndarray], sizes: list[int], seed: int = 0) -> Path:
    """A complete full error log of the given (E, N) errors per kind (eV/Å), structures of the given sizes."""
    rng = np.random.default_rng(seed)
    n_epochs, n_atoms = errors["direct"].shape
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    writer = ErrorLogWriter.create(
        folder, run_id=f"run{seed}", n_epochs=n_epochs, structure_offsets=offsets,
        numbers=rng.choice([1, 6, 8], size=n_atoms), reference_force_norms=rng.uniform(0.1, 5.0, n_atoms),
        training_files=[{"path": "train.extxyz", "sha256": "abc"}], training_data_hash="abc")
    for epoch in range(n_epochs):
        writer.begin_epoch(epoch)
        writer.write(0, errors["direct"][epoch], errors["conservative"][epoch])
        writer.end_epoch(f"fp{epoch}")
    writer.close()
    return folder


def synthetic_errors(n_epochs: int = 12, n_atoms: int = 90, seed: int = 0) -> dict[str, np.ndarray]:
    """Log-normal errors per kind, some on an edge, some below and above the histogram range (eV/Å)."""
    rng = np.random.default_rng(seed)
    out = {}
    for kind, centre in (("direct", -2.0), ("conservative", -1.5)):
        errors = rng.lognormal(centre, 1.2, (n_epochs, n_atoms)).astype(np.float32)
        errors[0, :5] = 0.1  # a power of ten: on an edge, counts as <= it
        errors[1, 5:8] = 1e-4  # below the range (underflow)
        errors[2, 8:10] = 500.0  # above it (overflow)
        out[kind] = errors
    return out


@pytest.fixture()
def full_log(tmp_path):
    errors = synthetic_errors()
    return write_full_log(tmp_path / "run" / "error_log", errors, [30, 25, 35]), errors


def test_log_edges_hold_every_power_of_ten_and_give_the_default_edges():
    edges = log_edges(10)
    assert edges[0] == 1e-3 and edges[-1] == 1e2 and len(edges) == 51
    assert {1e-2, 0.1, 1.0, 10.0} <= set(edges.tolist())
    assert np.allclose(edges[1:] / edges[:-1], 10 ** 0.1)
    assert np.array_equal(log_edges(16, 1e-4, 1e2), DEFAULT_EDGES)
    assert set(log_edges(5).tolist()) <= set(edges.tolist())  # coarser grids nest in finer ones exactly
    assert [count_dtype(n) for n in (1, 255, 256, 70000)] == [np.uint8, np.uint8, np.uint16, np.uint32]


def test_compact_log_is_exact_at_every_edge_and_log_linear_inside_a_bin(full_log, tmp_path):
    folder, errors = full_log
    compact = compact_error_log(folder, tmp_path / "compact")
    full = load_error_log(folder)
    assert compact.form == "histogram" and full.form == "full" and compact.epochs == full.epochs == (1, 12)
    for kind in ("direct", "conservative"):
        exact, binned = full.distribution(kind), compact.distribution(kind)
        assert binned.n_epochs == 12 and binned.n_atoms == 90
        assert binned.final_mean_error == exact.final_mean_error == pytest.approx(errors[kind][-1].mean(), rel=1e-6)
        edges = binned.bins.edges
        assert exact.final_mean_error in edges  # the default atol is an edge: exact there
        for t in edges:
            assert np.allclose(binned.confidence(t), sample_confidence(errors[kind], t), atol=1e-12), t
        lo, hi = edges[20], edges[21]
        mid = np.sqrt(lo * hi)
        below, above, between = binned.confidence(lo), binned.confidence(hi), binned.confidence(mid)
        assert np.allclose(between, (below + above) / 2)  # linear in log(error) inside the bin
        true = sample_confidence(errors[kind], mid)
        assert np.all(np.abs(between - true) <= above - below + 1e-12)  # off by at most the bin's own mass
        assert np.abs(between - true).max() > 0  # (and not exact there: the synthetic errors are spread)
        # relative tolerance: per-atom thresholds 0.1 + 0.2·|F_ref,i| read the same way, between the exact p_i at
        # the edges around each atom's threshold
        norms = compact.reference_force_norms
        t = 0.1 + 0.2 * norms.astype(np.float64)
        j = np.searchsorted(edges, t)
        read = binned.confidence(0.1, 0.2, norms)
        assert np.all(sample_confidence(errors[kind], 0.0, 1.0, edges[j - 1]) <= read + 1e-12)
        assert np.all(read <= sample_confidence(errors[kind], 0.0, 1.0, edges[j]) + 1e-12)
    assert np.array_equal(compact.atom_numbers, full.atom_numbers)
    assert np.array_equal(compact.structure_offsets, full.structure_offsets)
    assert np.allclose(compact.reference_force_norms, full.reference_force_norms, rtol=1e-3)
    for key in ("run_id", "training_data_hash", "training_files", "model_fingerprints", "n_epochs_completed"):
        assert compact.metadata[key] == full.metadata[key]
    with pytest.raises(InputError, match="holds per-atom counts, not every epoch's errors"):
        _ = compact.errors_direct


def test_counts_merge_exactly_onto_coarser_grids_and_runs_pool_on_shared_edges(full_log, tmp_path):
    folder, errors = full_log
    fine = compact_error_log(folder, tmp_path / "fine", per_decade=10).distribution("direct")
    coarse = compact_error_log(folder, tmp_path / "coarse", per_decade=5).distribution("direct")
    grid = HistogramBins(log_edges(5))
    assert np.array_equal(fine.histogram(grid), error_histogram(errors["direct"], grid))
    shared = common_bins([fine, coarse, ErrorTrajectory(errors["direct"])])
    assert np.array_equal(shared.edges, coarse.bins.edges)  # the 5/decade grid and the shared final-epoch mean
    with pytest.raises(InputError, match="cannot be re-binned"):
        coarse.histogram(HistogramBins(log_edges(10)))
    other = BinnedErrors(np.ones((90, 3), dtype=np.uint8), HistogramBins(np.array([0.011, 0.012])), 0.1)
    with pytest.raises(InputError, match="share fewer than two histogram edges"):
        common_bins([coarse, other])
    # an estimator from the compact logs of two "runs" equals the exact one at a shared edge
    index = build_index(np.random.default_rng(0).normal(size=(90, 4)).astype(np.float32))
    numbers, norms = np.ones(90, dtype=int), np.ones(90)
    edge = float(log_edges(5)[12])
    binned = fit_estimator([fine, coarse], numbers, norms, index, atol=edge)
    exact = fit_estimator([errors["direct"], errors["direct"]], numbers, norms, index, atol=edge)
    assert np.allclose(binned.confidence, exact.confidence, atol=1e-12)
    assert np.array_equal(binned.bins.edges, shared.edges) and binned.histogram.dtype == np.uint8
    default = fit_estimator([fine], numbers, norms, index)
    assert default.atol == fine.final_mean_error
    assert np.allclose(default.confidence, sample_confidence(errors["direct"], default.atol), atol=1e-12)


def test_a_compact_log_of_the_last_epochs_gives_only_those(full_log, tmp_path):
    folder, errors = full_log
    compact = compact_error_log(folder, tmp_path / "last", skip_epochs=4)
    assert compact.epochs == (5, 12) and compact.n_epochs == 8
    for skip in (None, 4):
        run = compact.distribution("direct", skip)
        assert np.allclose(run.confidence(0.1), sample_confidence(errors["direct"][4:], 0.1), atol=1e-12)
    for skip in (0, 3, 6):
        with pytest.raises(InputError, match=f"holding epochs 5-12 only .*--skip-epochs {skip}.*--skip-epochs 4"):
            compact.distribution("direct", skip)
    with pytest.raises(InputError, match="holding epochs 5-12"):
        load_runs([compact.directory], skip_epochs=0)
    runs, logs = load_runs([compact.directory, folder], skip_epochs=4)  # both forms over the same epochs
    assert np.allclose(runs[0].confidence(0.1), runs[1].confidence(0.1), atol=1e-12)
    with pytest.raises(InputError, match="leaves none of its 12 epochs"):
        load_error_log(folder).distribution("direct", 12)
    with pytest.raises(InputError, match="unknown error kind"):
        compact.distribution("forces")


def test_bad_compact_logs_and_requests_are_refused_naming_the_file(full_log, tmp_path):
    folder, errors = full_log
    good = compact_error_log(folder, tmp_path / "good").directory
    with pytest.raises(InputError, match="already a compact"):
        compact_error_log(good, tmp_path / "again")
    with pytest.raises(InputError, match="holds a full error log"):
        compact_error_log(folder, folder)
    with pytest.raises(InputError, match="leaves none of its 12 epochs"):
        compact_error_log(folder, tmp_path / "none", skip_epochs=12)
    # other atoms: a run over fewer atoms, compact or full, cannot join
    other = write_full_log(tmp_path / "other" / "error_log", synthetic_errors(n_atoms=60, seed=1), [30, 30], seed=1)
    other_compact = compact_error_log(other, tmp_path / "other_compact").directory
    for pair in ([good, other], [folder, other_compact]):
        with pytest.raises(InputError, match="atoms that differ"):
            load_runs(pair)

    def damaged(name: str, change) -> Path:
        copy = tmp_path / name
        shutil.copytree(good, copy)
        change(copy)
        return copy

    truncated = damaged("truncated", lambda d: (d / HISTOGRAMS).write_bytes((good / HISTOGRAMS).read_bytes()[:500]))
    with pytest.raises(InputError, match=f"{HISTOGRAMS}: unreadable compact error log"):
        load_error_log(truncated)
    missing = damaged("missing", lambda d: (d / HISTOGRAMS).unlink())
    with pytest.raises(InputError, match=f"{HISTOGRAMS}: missing"):
        load_error_log(missing)

    def rewrite(d: Path, **changes) -> None:
        with np.load(d / HISTOGRAMS) as data:
            arrays = {k: data[k] for k in data.files}
        arrays.update(changes)
        with zipfile.ZipFile(d / HISTOGRAMS, "w") as archive:
            for k, v in arrays.items():
                with archive.open(f"{k}.npy", "w") as member:
                    np.lib.format.write_array(member, v)

    with np.load(good / HISTOGRAMS) as data:
        counts = data["counts_direct"].copy()
    counts[7, 3] += 1
    recounted = damaged("recounted", lambda d: rewrite(d, counts_direct=counts))
    with pytest.raises(InputError, match=r"direct histograms are inconsistent .*atom 7 counts 13"):
        load_error_log(recounted)
    fewer = damaged("fewer", lambda d: rewrite(d, atom_numbers=np.ones(10, dtype=np.uint8)))
    with pytest.raises(InputError, match=r"atom_numbers of shape \(10,\), expected \(90,\)"):
        load_error_log(fewer)

    def shift_epochs(d: Path) -> None:
        meta = json.loads((d / METADATA).read_text())
        meta["epochs_held"] = [3, 12]
        (d / METADATA).write_text(json.dumps(meta))

    with pytest.raises(InputError, match="count 12 epochs per atom, the metadata says epochs 3-12"):
        load_error_log(damaged("epochs", shift_epochs))


def test_cli_compact_log_writes_a_folder_ltau_fit_reads(full_log, tmp_path):
    folder, _ = full_log
    out = tmp_path / "compact"
    res = runner.invoke(app, ["ltau", "compact", str(folder), "-o", str(out), "--skip-epochs", "2"])
    assert res.exit_code == 0, res.output
    assert "90 atoms, epochs 3-12" in res.output and sorted(p.name for p in out.iterdir()) == sorted([METADATA, HISTOGRAMS])
    assert load_error_log(out).epochs == (3, 12)
    res = runner.invoke(app, ["ltau", "compact", str(folder), "-o", str(folder / METADATA)])
    assert res.exit_code == 1 and "is a file, not a folder" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["ltau", "compact", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and "is not an error-log folder" in res.output


def test_committed_compact_log_matches_the_full_log():
    full = load_error_log(COMMITTED / "error_log")
    compact = load_error_log(COMMITTED / "error_log_histogram")
    assert compact.form == "histogram" and compact.epochs == full.epochs
    assert compact.metadata["model_fingerprints"] == full.metadata["model_fingerprints"]
    size = sum(p.stat().st_size for p in compact.directory.iterdir())
    assert size * 20 < sum(p.stat().st_size for p in full.directory.iterdir())
    for kind in ("direct", "conservative"):
        exact, binned = full.distribution(kind), compact.distribution(kind)
        atol = exact.final_mean_error
        assert binned.final_mean_error == atol
        assert np.allclose(binned.confidence(atol), exact.confidence(atol), atol=1e-12)
        edges = binned.bins.edges
        for j in (15, 22, 30):
            assert np.allclose(binned.confidence(edges[j]), exact.confidence(edges[j]), atol=1e-12)
        t = np.sqrt(edges[22] * edges[23])
        lo, hi, true = binned.confidence(edges[22]), binned.confidence(edges[23]), exact.confidence(t)
        assert np.all(np.abs(binned.confidence(t) - true) <= hi - lo + 1e-12)

"""The local engine: shards, exact resume after an interruption, refusal of changed settings or inputs."""

import gzip

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read

import atomuq.engines.local as local
from atomuq.core.errors import InputError
from atomuq.core.io import Record
from atomuq.engines.local import score_file, work_folder
from atomuq.workflows.score import ScoreSettings, score_records
from conftest import make_native


@pytest.fixture(scope="module")
def model():
    return make_native(seed=3).float()


def records(n=7):
    names = ["H2O", "CH4", "NH3", "CH3OH", "C2H6", "HCOOH", "CH3CHO", "C2H4"]
    out = []
    for k in range(n):
        atoms = molecule(names[k % len(names)])
        atoms.rattle(0.05, seed=k)
        forces = np.random.default_rng(k).normal(scale=0.3, size=(len(atoms), 3))
        atoms.calc = SinglePointCalculator(atoms, energy=-float(k), forces=forces)
        out.append(Record(atoms, "mols.extxyz", k))
    return out


class Interrupt(Exception):
    pass


def interrupt_after(monkeypatch, shards):
    """Make score_shard raise after `shards` shards, as a kill would stop the run; returns the call counter."""
    real, calls = local.score_shard, []

    def flaky(*args, **kwargs):
        if len(calls) == shards:
            raise Interrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(local, "score_shard", flaky)
    return calls


def interrupted_run(monkeypatch, model, out, shards, settings=ScoreSettings(batch_size=2)):
    """A run stopped after `shards` finished shards (shard size 2)."""
    with monkeypatch.context() as patch:
        interrupt_after(patch, shards)
        with pytest.raises(Interrupt):
            score_file(records(), model, out, settings, shard_size=2)


def test_interrupted_run_resumes_to_the_identical_file(tmp_path, model, monkeypatch):
    settings = ScoreSettings(batch_size=2)
    whole = score_file(records(), model, tmp_path / "whole.extxyz", settings, shard_size=2)
    assert whole.n_shards == 4 and whole.resumed == 0 and not work_folder(tmp_path / "whole.extxyz").exists()
    out = tmp_path / "out.extxyz"
    interrupted_run(monkeypatch, model, out, 2, settings)
    folder = work_folder(out)
    assert not out.exists() and sorted(p.name for p in folder.glob("shard-*")) == [
        "shard-000000.extxyz", "shard-000001.extxyz"]
    calls = interrupt_after(monkeypatch, 99)
    again = score_file(records(), model, out, settings, shard_size=2)
    assert again.resumed == 2 and len(calls) == 2  # only the two unfinished shards were computed
    assert out.read_bytes() == (tmp_path / "whole.extxyz").read_bytes()
    assert not folder.exists()
    assert [r.force_delta for r in again.rows] == [r.force_delta for r in whole.rows]
    # and the file equals the in-memory library result, in input order
    frames = read(out, ":")
    scored, _ = score_records(records(), model, batch_size=2)
    assert [f.info["source_index"] for f in frames] == list(range(7))
    assert np.allclose([f.info["force_delta"] for f in frames], [a.info["force_delta"] for a in scored])


def test_changed_settings_or_inputs_are_refused_by_name(tmp_path, model, monkeypatch):
    out = tmp_path / "out.extxyz"
    interrupted_run(monkeypatch, model, out, 1)
    with pytest.raises(InputError, match=r"other settings .*rotational False -> True"):
        score_file(records(), model, out, ScoreSettings(batch_size=2, rotational=True), shard_size=2)
    with pytest.raises(InputError, match="model_fingerprint"):
        score_file(records(), make_native(seed=4).float(), out, ScoreSettings(batch_size=2), shard_size=2)
    changed = records()
    changed[1].atoms.positions[0, 0] += 0.01
    with pytest.raises(InputError, match=r"input structures changed .*mols.extxyz structures 0-1"):
        score_file(changed, model, out, ScoreSettings(batch_size=2), shard_size=2)
    relabelled = records()
    relabelled[6].atoms.calc.results["energy"] = 1.0
    with pytest.raises(InputError, match=r"mols.extxyz structures 6-6"):
        score_file(relabelled, model, out, ScoreSettings(batch_size=2), shard_size=2)
    assert (work_folder(out) / "shard-000000.extxyz").is_file()  # nothing lost by a refused rerun
    run = score_file(records(), model, out, ScoreSettings(batch_size=2), shard_size=2)
    assert run.resumed == 1 and len(read(out, ":")) == 7


def test_a_run_that_finished_no_shard_does_not_block_other_settings(tmp_path, model, monkeypatch):
    out = tmp_path / "out.extxyz"
    interrupted_run(monkeypatch, model, out, 0)
    run = score_file(records(), model, out, ScoreSettings(batch_size=3))
    assert run.resumed == 0 and len(read(out, ":")) == 7 and not work_folder(out).exists()


def test_compressed_output_and_refusals_before_work(tmp_path, model):
    out = tmp_path / "out.extxyz.gz"
    score_file(records(3), model, out, ScoreSettings(batch_size=2), shard_size=2)
    text = gzip.decompress(out.read_bytes()).decode()
    assert text.count("Properties=") == 3 and len(read(out, ":")) == 3
    with pytest.raises(InputError, match=r"\.traj"):
        score_file(records(3), model, tmp_path / "o.traj")
    overlapping = records(2)
    overlapping[1].atoms.positions[1] = overlapping[1].atoms.positions[0]
    with pytest.raises(InputError, match="mols.extxyz structure 1"):
        score_file(overlapping, model, tmp_path / "bad.extxyz")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        score_file(records(2), model, afile / "out.extxyz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "out.extxyz.gz"]

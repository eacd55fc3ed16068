"""The Ray engine on a local two-CPU Ray cluster (one for the module): the output equals the local engine's
structure by structure; a worker that raises or dies, or an interrupted driver, loses only the shards in flight and
a rerun scores only the rest; changed settings and bad inputs are refused as by the local engine, before Ray."""

import os
import sys

import numpy as np
import pytest
from ase.io import read

from atomuq.core.errors import InputError
from atomuq.engines.local import score_file, work_folder
from atomuq.models.native import NativeModel
from atomuq.workflows.score import ScoreSettings
from test_engine_local import records
from conftest import make_native

ray = pytest.importorskip("ray")
import atomuq.engines.ray as ray_engine  # noqa: E402
from atomuq.engines.ray import score_file_ray  # noqa: E402

SETTINGS = ScoreSettings(batch_size=2)  # with shard size 2: one model call per shard, of 8, 10, 13 and 7 atoms


class Broken(Exception):
    pass


class Logged(NativeModel):
    """The test model, appending each batch's atom count to `log`, raising on a batch of `fail_atoms` atoms and
    exiting its process on one of `die_atoms` atoms while the file `die_flag` exists (removing it)."""

    log = fail_atoms = die_atoms = die_flag = None

    def forward(self, batch):
        n = int(batch.positions.shape[0])
        if self.log is not None:
            with open(self.log, "a") as handle:
                handle.write(f"{n}\n")
        if n == self.fail_atoms:
            raise Broken(f"batch of {n} atoms")
        if n == self.die_atoms and os.path.exists(self.die_flag):
            os.remove(self.die_flag)
            os._exit(1)
        return super().forward(batch)


def assert_same_scores(ours, theirs):
    """The same structures with the same keys and values, floats to float32 round-off: a Ray actor computes with
    its own torch thread count, which changes the order of the sums inside a matrix product (last bits only)."""
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert sorted(a.info) == sorted(b.info) and sorted(a.arrays) == sorted(b.arrays)
        for key, value in a.info.items():
            if isinstance(value, float):
                assert value == pytest.approx(b.info[key], rel=1e-5, abs=1e-6), key
            else:
                assert value == b.info[key], key
        for name in a.arrays:
            if a.arrays[name].dtype.kind == "f":
                np.testing.assert_allclose(a.arrays[name], b.arrays[name], rtol=1e-5, atol=1e-6, err_msg=name)
            else:
                assert np.array_equal(a.arrays[name], b.arrays[name]), name
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), rtol=1e-5, atol=1e-6)
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), rel=1e-6)


def computed(log):
    """The atom counts of the shards computed, in the order logged."""
    return [int(line) for line in log.read_text().split()] if log.exists() else []


@pytest.fixture(scope="module")
def cluster():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the test module
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture()
def model(tmp_path):
    base = make_native(seed=3).float()
    logged = Logged(base.config).float().eval()
    logged.load_state_dict(base.state_dict())
    logged.log = str(tmp_path / "computed.log")
    return logged


@pytest.fixture()
def local_file(tmp_path, model):
    path = tmp_path / "local.extxyz"
    score_file(records(), model, path, SETTINGS, shard_size=2)
    os.remove(model.log)
    return path


def test_output_equals_the_local_engine_structure_by_structure(cluster, tmp_path, model, local_file):
    counts = []
    run = score_file_ray(records(), model, tmp_path / "ray.extxyz", SETTINGS, shard_size=2, progress=counts.append,
                         num_workers=2)
    assert run.n_shards == 4 and run.resumed == 0 and sorted(counts) == [1, 2, 2, 2]
    assert sorted(computed(tmp_path / "computed.log")) == [7, 8, 10, 13]
    assert not work_folder(tmp_path / "ray.extxyz").exists()
    ours = read(tmp_path / "ray.extxyz", ":")
    assert len(ours) == 7
    assert_same_scores(ours, read(local_file, ":"))


def test_a_worker_that_raises_keeps_the_other_shards_and_the_rerun_scores_only_its_own(cluster, tmp_path, model,
                                                                                       local_file):
    out, log = tmp_path / "out.extxyz", tmp_path / "computed.log"
    model.fail_atoms = 13  # shard 2
    with pytest.raises(Broken, match="13 atoms"):
        score_file_ray(records(), model, out, SETTINGS, shard_size=2, num_workers=2)
    assert not out.exists()
    assert sorted(p.name for p in work_folder(out).glob("shard-*")) == [
        "shard-000000.extxyz", "shard-000001.extxyz", "shard-000003.extxyz"]  # the shards in flight were written
    os.remove(log)
    model.fail_atoms = None
    run = score_file_ray(records(), model, out, SETTINGS, shard_size=2, num_workers=2)
    assert run.resumed == 3 and computed(log) == [13]
    assert_same_scores(read(out, ":"), read(local_file, ":"))


def test_an_interrupted_driver_resumes_into_a_folder_of_shards(cluster, tmp_path, model, local_file):
    out, log = tmp_path / "shards", tmp_path / "computed.log"

    def interrupt(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_file_ray(records(), model, out, SETTINGS, shard_size=2, progress=interrupt, num_workers=2,
                       as_folder=True)
    finished = {p.name: p.stat() for p in work_folder(out).glob("shard-*")}
    assert len(finished) == 1 and not out.exists()
    os.remove(log)
    run = score_file_ray(records(), model, out, SETTINGS, shard_size=2, num_workers=2, as_folder=True)
    assert run.resumed == 1 and len(computed(log)) == 3 and not work_folder(out).exists()
    shards = sorted(out.glob("shard-*.extxyz"))
    assert [p.name for p in shards] == [f"shard-{k:06d}.extxyz" for k in range(4)]
    for name, before in finished.items():  # the finished shard was kept, not rewritten
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert_same_scores([atoms for p in shards for atoms in read(p, ":")], read(local_file, ":"))
    assert (out / "manifest.json").is_file()
    with pytest.raises(InputError, match="not empty"):
        score_file_ray(records(), model, out, SETTINGS, shard_size=2, as_folder=True)


def test_a_killed_worker_is_restarted_and_only_its_shard_recomputed(cluster, tmp_path, model, local_file):
    model.die_atoms, model.die_flag = 10, str(tmp_path / "die")
    (tmp_path / "die").write_text("")
    run = score_file_ray(records(), model, tmp_path / "out.extxyz", SETTINGS, shard_size=2, num_workers=2)
    assert not (tmp_path / "die").exists() and run.resumed == 0
    assert sorted(computed(tmp_path / "computed.log")) == [7, 8, 10, 10, 13]  # shard 1 twice, every other once
    assert_same_scores(read(tmp_path / "out.extxyz", ":"), read(local_file, ":"))


def test_changed_settings_and_bad_inputs_are_refused_as_by_the_local_engine(cluster, tmp_path, model, monkeypatch):
    out = tmp_path / "out.extxyz"
    model.fail_atoms = 10  # shard 1: the run stops with shard 0 written (one worker)
    with pytest.raises(Broken):
        score_file_ray(records(), model, out, SETTINGS, shard_size=2, num_workers=1)
    model.fail_atoms = None
    with pytest.raises(InputError, match=r"other settings .*rotational False -> True"):
        score_file_ray(records(), model, out, ScoreSettings(batch_size=2, rotational=True), shard_size=2)
    with pytest.raises(InputError, match=r"other settings .*rotational False -> True"):
        score_file(records(), model, out, ScoreSettings(batch_size=2, rotational=True), shard_size=2)
    assert (work_folder(out) / "shard-000000.extxyz").is_file()

    def no_ray(address):
        raise AssertionError("Ray was started before the inputs were checked")

    monkeypatch.setattr(ray_engine, "connect", no_ray)
    overlapping = records(2)
    overlapping[1].atoms.positions[1] = overlapping[1].atoms.positions[0]
    for engine in (score_file, score_file_ray):
        with pytest.raises(InputError, match="mols.extxyz structure 1"):
            engine(overlapping, model, tmp_path / "bad.extxyz")
        with pytest.raises(InputError, match=r"\.traj"):
            engine(records(2), model, tmp_path / "o.traj")
    assert not (tmp_path / "bad.extxyz").exists() and not work_folder(tmp_path / "bad.extxyz").exists()


def test_a_run_the_cluster_cannot_hold_is_refused(cluster, tmp_path, model):
    with pytest.raises(InputError, match="3 workers need 3 CPUs .* has 2 CPUs"):
        score_file_ray(records(), model, tmp_path / "out.extxyz", num_workers=3)
    with pytest.raises(InputError, match="no GPUs"):
        score_file_ray(records(), model, tmp_path / "out.extxyz", gpus_per_worker=1)


def test_score_command_with_engine_ray_writes_what_engine_local_writes(cluster, tmp_path):
    """`atomuq score --engine ray` (the CLI path) against `--engine local` on the shipped demo, bundled model."""
    from typer.testing import CliRunner

    from atomuq.cli.main import app

    demo = "src/atomuq/data/structures/molecular_demo.extxyz"
    runner = CliRunner()
    local, distributed = tmp_path / "local.extxyz", tmp_path / "ray.extxyz"
    assert runner.invoke(app, ["score", demo, "-o", str(local)]).exit_code == 0
    result = runner.invoke(app, ["score", demo, "-o", str(distributed), "--engine", "ray"])
    assert result.exit_code == 0, result.output
    assert_same_scores(read(distributed, ":"), read(local, ":"))
    bad = runner.invoke(app, ["score", demo, "-o", str(tmp_path / "x.extxyz"), "--address", "127.0.0.1:1"])
    assert bad.exit_code == 1 and "only with --engine ray" in bad.output

"""LTAU descriptor indexes at scale: the compressed kinds (ivfsq, ivfpq), building in shards from memory-mapped .npy
files, recall against exact search, estimator files memory-mapped on load, and clear errors for bad input."""

from __future__ import annotations

import zipfile

import faiss
import numpy as np
import pytest

from atomuq.core.errors import InputError
from atomuq.core.io import npz_member_memmap
from atomuq.uq.ltau.estimator import LTAUEstimator, fit_estimator
from atomuq.uq.ltau.index import (
    IVF_KINDS,
    KINDS,
    DescriptorFiles,
    build_index,
    exact_neighbours,
    measure_recall,
    resolve_parameters,
)


def clustered(n: int, d: int = 8, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """A Gaussian mixture: cluster centres spread 4 units apart, members 0.5 around them (float32)."""
    rng = np.random.default_rng(seed)
    centres = 4.0 * rng.normal(size=(clusters, d))
    return (centres[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, d))).astype(np.float32)


def brute_force(data: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids) of the k nearest rows by numpy in float64."""
    d2 = ((queries[:, None, :].astype(np.float64) - data[None, :, :]) ** 2).sum(-1)
    ids = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return np.sqrt(np.take_along_axis(d2, ids, axis=1)), ids


SMALL = {"ivf": {"nlist": 16}, "ivfsq": {"nlist": 16}, "ivfpq": {"nlist": 16, "m": 8}}


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(3000)


def serialised(index) -> bytes:
    return faiss.serialize_index(index.index).tobytes()


# ---------------------------------------------------------------- recall and distances


@pytest.mark.parametrize("kind", ["ivfsq", "ivfpq"])
def test_compressed_index_recall_against_numpy_brute_force(data, kind):
    params = {**SMALL[kind], "nprobe": 16}  # every list probed: only the codes' rounding can miss a neighbour
    index = build_index(data, kind, params, recall_queries=100, recall_k=5)
    queries = clustered(60, seed=1)
    exact_d, exact_ids = brute_force(data, queries, 5)
    distance, ids = index.search(queries, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids, exact_ids)])
    assert recall >= (0.95 if kind == "ivfsq" else 0.8)
    assert measure_recall(index, data, queries, 5) == pytest.approx(recall)
    assert 0.9 <= index.recall <= 1.0 and index.recall_k == 5 and index.recall_queries == 100
    # the codes approximate distances: 8-bit scalar codes to about a percent, one-byte PQ codes of each dimension coarser
    found = ids[:, 0] == exact_ids[:, 0]
    rel = np.abs(distance[found, 0] - exact_d[found, 0]) / exact_d[found, 0]
    assert np.median(rel) < (0.02 if kind == "ivfsq" else 0.2)


def test_fewer_probes_find_fewer_neighbours_and_the_index_reports_it(data):
    wide = build_index(data, "ivfsq", {"nlist": 64, "nprobe": 64}, recall_queries=200)
    narrow = build_index(data, "ivfsq", {"nlist": 64, "nprobe": 1}, recall_queries=200)
    assert narrow.recall < wide.recall
    assert narrow.parameters["nprobe"] == 1 and narrow.parameters["train"] == len(data)
    queries = clustered(50, seed=5)
    before = measure_recall(narrow, data, queries, 5)
    assert narrow.tune(nprobe=64).parameters["nprobe"] == 64  # search-time parameters change without a rebuild
    assert measure_recall(narrow, data, queries, 5) == measure_recall(wide, data, queries, 5) > before
    with pytest.raises(InputError, match=r"\['nlist'\]: not search parameters of this ivfsq index"):
        narrow.tune(nlist=3)
    with pytest.raises(InputError, match="must be >= 1"):
        narrow.tune(quantizer_ef=0)


def test_lists_with_fewer_than_k_vectors_are_searched_again_wider():
    """One probed list of ~20 vectors cannot always give k = 20: those queries are searched with more probes, the others
    keep their result, and the index's own nprobe is unchanged."""
    data = clustered(2000, clusters=200)
    index = build_index(data, "ivfsq", {"nlist": 100, "nprobe": 1}, recall_queries=20)
    queries = clustered(40, clusters=200, seed=6)
    distance, ids = index.search(queries, 20)
    assert (ids >= 0).all() and index.parameters["nprobe"] == 1
    assert faiss.extract_index_ivf(index.index).nprobe == 1
    assert np.all(np.diff(distance, axis=1) >= -1e-6)
    _, raw = index.index.search(queries, 20)  # FAISS alone, one probe: holes (-1) for some queries
    holes = (raw < 0).any(axis=1)
    assert holes.any() and not holes.all()
    assert np.array_equal(ids[~holes], raw[~holes])


def test_exact_neighbours_streamed_over_shards_equal_brute_force(data):
    queries = clustered(30, seed=2)
    _, expected = brute_force(data, queries, 7)
    for rows in (len(data), 500, 3):  # shards of 3 rows: fewer than k rows in a shard
        assert np.array_equal(exact_neighbours(data, queries, 7, shard_rows=rows), expected)


def test_automatic_nlist_and_training_sample_follow_the_size():
    assert resolve_parameters("ivfsq", None, 10**6, 64)["nlist"] == 16000
    assert resolve_parameters("ivfsq", None, 10**7, 64)["nlist"] == int(16 * np.sqrt(10**7))
    assert resolve_parameters("ivfsq", None, 4000, 64)["nlist"] == 100  # N / 40: every list trained on 40 rows
    assert resolve_parameters("ivfsq", None, 10**6, 64)["train"] == 40 * 16000
    assert resolve_parameters("ivf", None, 10**6, 64)["nlist"] == 4000


# ---------------------------------------------------------------- shards, files


@pytest.mark.parametrize("kind", KINDS)
def test_built_in_shards_equals_built_at_once(data, kind):
    """The same trained index filled 250 rows at a time holds the same codes and ids as filled at once."""
    once = build_index(data, kind, SMALL.get(kind), recall_queries=50)
    sharded = build_index(data, kind, SMALL.get(kind), recall_queries=50, shard_rows=250)
    if kind == "hnsw":  # a graph depends on how its insertions were batched: only a working index is promised
        assert sharded.size == once.size and sharded.recall >= 0.9
        return
    assert serialised(sharded) == serialised(once)
    if kind in IVF_KINDS:
        lists = faiss.extract_index_ivf(sharded.index).invlists
        ids = np.concatenate([faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(lists.nlist)])
        assert np.array_equal(np.sort(ids), np.arange(len(data)))  # every row once, under its row number


def test_built_from_memory_mapped_npy_files_equals_built_from_the_array(data, tmp_path):
    np.save(tmp_path / "all.npy", data)
    np.save(tmp_path / "a.npy", data[:1234])
    np.save(tmp_path / "b.npy", data[1234:].astype(np.float64))  # another float type is read as float32
    reference = build_index(data, "ivfsq", SMALL["ivfsq"], recall_queries=50)
    for source in (tmp_path / "all.npy", str(tmp_path / "all.npy"), [tmp_path / "a.npy", tmp_path / "b.npy"]):
        index = build_index(source, "ivfsq", SMALL["ivfsq"], recall_queries=50, shard_rows=700)
        assert serialised(index) == serialised(reference)
        assert index.recall == reference.recall


def test_descriptor_files_read_rows_across_files(data, tmp_path):
    parts = [data[:10], data[10:11], data[11:500]]
    for i, part in enumerate(parts):
        np.save(tmp_path / f"{i}.npy", part)
    files = DescriptorFiles([tmp_path / f"{i}.npy" for i in range(3)])
    assert files.shape == (500, data.shape[1]) and len(files) == 500
    assert np.array_equal(files[5:300], data[5:300])
    rows = np.array([0, 9, 10, 11, 499])
    assert np.array_equal(files[rows], data[rows])


# ---------------------------------------------------------------- files memory-mapped on load


def estimator_of(index, n: int, seed: int = 0) -> LTAUEstimator:
    rng = np.random.default_rng(seed)
    runs = [rng.lognormal(-2, 0.6, (12, n)).astype(np.float32)]
    return fit_estimator(runs, rng.integers(1, 3, n), np.abs(rng.normal(size=n)), index, atol=0.12)


@pytest.mark.parametrize("kind", ["flat", "ivfsq", "ivfpq"])
def test_estimator_round_trip_memory_maps_the_index_and_arrays(data, kind, tmp_path):
    estimator = estimator_of(build_index(data, kind, SMALL.get(kind), recall_queries=50), len(data))
    path = estimator.save(tmp_path / "est.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["est.npz"]  # the index's temporary file is gone
    loaded = LTAUEstimator.load(path)
    assert loaded.index.memory_mapped and not estimator.index.memory_mapped
    assert isinstance(loaded.histogram, np.memmap) and isinstance(loaded.confidence, np.memmap)
    assert loaded.index.recall == estimator.index.recall and loaded.index.parameters == estimator.index.parameters
    queries = clustered(40, seed=3)
    for atol in (None, 0.2):
        a, b = estimator.predict(queries, k=3, atol=atol), loaded.predict(queries, k=3, atol=atol)
        assert np.array_equal(a.neighbours, b.neighbours)
        for key in a.per_atom:
            assert np.array_equal(a.per_atom[key], b.per_atom[key]), key
    # what predict reads of the histograms (only the neighbours' rows) is what the whole arrays give
    full = estimator.mean_errors()[a.neighbours].mean(axis=1) * estimator.scale
    assert np.allclose(a.expected_error, full)
    assert np.allclose(estimator.training_confidence(0.2)[a.neighbours].mean(axis=1), a.confidence)


def test_compressed_estimator_file_still_loads_without_memory_map(data, tmp_path):
    estimator = estimator_of(build_index(data, "ivfsq", SMALL["ivfsq"], recall_queries=50), len(data))
    plain = estimator.save(tmp_path / "est.npz")
    with np.load(plain) as archive:
        arrays = {key: archive[key] for key in archive.files}
    np.savez_compressed(tmp_path / "packed.npz", **arrays)
    assert npz_member_memmap(tmp_path / "packed.npz", "index") is None
    loaded = LTAUEstimator.load(tmp_path / "packed.npz")
    assert not loaded.index.memory_mapped
    queries = clustered(10, seed=4)
    assert np.array_equal(loaded.predict(queries, 2).neighbours, estimator.predict(queries, 2).neighbours)


def test_npz_member_memmap_maps_the_stored_values(tmp_path):
    c = np.arange(24, dtype=np.float32).reshape(4, 6)
    np.savez(tmp_path / "x.npz", c=c, f=np.asfortranarray(c.astype(np.int16)), empty=np.zeros((0, 3)))
    mapped = npz_member_memmap(tmp_path / "x.npz", "c")
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, c)
    assert np.array_equal(npz_member_memmap(tmp_path / "x.npz", "f"), c.astype(np.int16))
    assert npz_member_memmap(tmp_path / "x.npz", "empty") is None
    assert npz_member_memmap(tmp_path / "x.npz", "missing") is None
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert npz_member_memmap(tmp_path / "bad.npz", "c") is None


def test_truncated_estimator_file_is_an_input_error(data, tmp_path):
    estimator = estimator_of(build_index(data, "ivfsq", SMALL["ivfsq"], recall_queries=50), len(data))
    path = estimator.save(tmp_path / "est.npz")
    raw = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="cut.npz"):
        LTAUEstimator.load(tmp_path / "cut.npz")
    assert zipfile.is_zipfile(path)


# ---------------------------------------------------------------- bad input


def test_bad_descriptors_and_parameters_are_input_errors(data, tmp_path):
    index = build_index(data, "ivfsq", SMALL["ivfsq"], recall_queries=20)
    with pytest.raises(InputError, match="width 5 cannot be searched in an index of width 8"):
        index.search(np.zeros((2, 5)), 1)
    broken = data.copy()
    broken[2500, 3] = np.nan
    with pytest.raises(InputError, match="first in row 2500"):
        build_index(broken, "ivfsq", SMALL["ivfsq"], shard_rows=1000)
    with pytest.raises(InputError, match="real numbers"):
        build_index(np.full((20, 3), "a"), "flat")
    with pytest.raises(InputError, match=r"non-empty \(n, d\) array"):
        build_index(np.zeros(10), "flat")
    with pytest.raises(InputError, match="m = 3 sub-vectors must divide the descriptor width 8"):
        build_index(data, "ivfpq", {"m": 3})
    with pytest.raises(InputError, match="at least 256 vectors"):
        build_index(data[:100], "ivfpq", {"m": 4})
    with pytest.raises(InputError, match="nlist = 5000 needs at least that many vectors"):
        build_index(data, "ivfsq", {"nlist": 5000})
    with pytest.raises(InputError, match=r"unknown ivfsq index parameters \['m'\]"):
        build_index(data, "ivfsq", {"m": 4})
    with pytest.raises(InputError, match="nprobe must be >= 1"):
        build_index(data, "ivfsq", {"nprobe": 0})
    with pytest.raises(InputError, match="unknown index kind 'ivfflat'"):
        build_index(data, "ivfflat")
    with pytest.raises(InputError, match="missing.npy: descriptor file not found"):
        build_index(tmp_path / "missing.npy", "ivfsq")
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(InputError, match="text.npy: not a .npy array"):
        build_index(tmp_path / "text.npy", "ivfsq")
    np.save(tmp_path / "a.npy", data)
    np.save(tmp_path / "b.npy", data[:, :5])
    with pytest.raises(InputError, match=r"different widths \[5, 8\]"):
        build_index([tmp_path / "a.npy", tmp_path / "b.npy"], "ivfsq")


def test_estimator_refuses_descriptors_of_another_width(data, tmp_path):
    estimator = estimator_of(build_index(data, "ivfsq", SMALL["ivfsq"], recall_queries=20), len(data))
    loaded = LTAUEstimator.load(estimator.save(tmp_path / "est.npz"))
    with pytest.raises(InputError, match="est.npz: fitted on descriptors of width 8, got width 6"):
        loaded.predict(np.zeros((3, 6)), k=1)

"""The LTAU index built on a local two-CPU Ray cluster: shards encoded by Ray tasks from memory-mapped .npy files
and merged on the driver give the index of a local build, code for code; kinds that are not made of independent
shards are refused before Ray is touched."""

import faiss
import numpy as np
import pytest

from atomuq.core.errors import InputError
from atomuq.uq.ltau.index import build_index
from test_ltau_index import SMALL, clustered

ray = pytest.importorskip("ray")
from atomuq.engines.ray_index import build_index_ray  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.mark.parametrize("kind", ["flat", "ivfsq"])
def test_ray_build_from_files_equals_local_build(cluster, kind, tmp_path):
    data = clustered(3000)
    np.save(tmp_path / "a.npy", data[:1100])
    np.save(tmp_path / "b.npy", data[1100:])
    local = build_index(data, kind, SMALL.get(kind), recall_queries=80)
    merged = []
    index = build_index_ray([tmp_path / "a.npy", tmp_path / "b.npy"], kind, SMALL.get(kind), recall_queries=80,
                            shard_rows=400, in_flight=3, progress=merged.append)
    assert faiss.serialize_index(index.index).tobytes() == faiss.serialize_index(local.index).tobytes()
    assert index.recall == local.recall and index.parameters == local.parameters
    assert merged == [400] * 7 + [200]  # every shard merged once, in row order


def test_ray_build_from_an_array_and_refusals(cluster):
    data = clustered(1000)
    local = build_index(data, "ivf", SMALL["ivf"], recall_queries=50)
    index = build_index_ray(data, "ivf", SMALL["ivf"], recall_queries=50, shard_rows=300)
    assert faiss.serialize_index(index.index).tobytes() == faiss.serialize_index(local.index).tobytes()
    with pytest.raises(InputError, match="hnsw index cannot be built in independent shards"):
        build_index_ray(data, "hnsw")
    broken = data.copy()
    broken[700, 1] = np.inf
    with pytest.raises(InputError, match="first in row 700"):
        build_index_ray(broken, "ivfsq", SMALL["ivfsq"], shard_rows=300)

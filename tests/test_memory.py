"""The allocator setting applies on Linux and can be switched off."""

import os
import subprocess
import sys

import pytest

CODE = "from atomuq.core.memory import reuse_freed_memory; print(reuse_freed_memory(), reuse_freed_memory())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.parametrize("value, expected", [("1", "True True"), ("0", "False False")])
def test_reuse_freed_memory_switch(value, expected):
    env = {**os.environ, "ATOMUQ_KEEP_FREED_MEMORY": value}
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == expected


REUSE = """
import resource, torch
from atomuq.core.memory import reuse_freed_memory
reuse_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(2**24)  # 64 MiB
counts = []
for _ in range(6):
    start = faults()
    (x * 2.0).sum()  # a fresh 64 MiB result each time, freed at once
    counts.append(faults() - start)
print(min(counts[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.parametrize("keep, low", [("1", True), ("0", False)])
def test_freed_memory_is_reused_without_page_faults(keep, low):
    """A 64 MiB temporary allocated and freed again and again is served from the heap: it does not page-fault
    all its 16,384 pages each time (as it did when the trim threshold was a value ctypes truncated to 0, and as
    it does with glibc's defaults). The least count over repeats: the system may reclaim idle memory now and then."""
    env = {**os.environ, "ATOMUQ_KEEP_FREED_MEMORY": keep, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", REUSE], capture_output=True, text=True, env=env, check=True)
    assert (float(out.stdout.strip()) < 1000) == low


LIMITED = """
import resource
from atomuq.core.memory import available_memory
size = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.RLIM_INFINITY))
print(available_memory())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and rlimits")
def test_available_memory_respects_the_address_space_limit():
    out = subprocess.run([sys.executable, "-c", LIMITED], capture_output=True, text=True, check=True)
    assert 0 < int(out.stdout.strip()) < 1.2 * 2**30

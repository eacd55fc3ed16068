"""The allocator setting applies on Linux and can be switched off."""

import subprocess
import sys

import pytest

CODE = "from atomuq.core.memory import reuse_freed_memory; print(reuse_freed_memory(), reuse_freed_memory())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.parametrize("value, expected", [("1", "True True"), ("0", "False False")])
def test_reuse_freed_memory_switch(value, expected):
    env = {"ATOMUQ_KEEP_FREED_MEMORY": value, "PATH": ""}
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == expected

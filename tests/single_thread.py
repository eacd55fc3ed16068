"""One torch thread for a test module (tiny tensors: faster than two on a shared machine, and the same reduction
order as the recorded training runs): `from single_thread import one_thread  # noqa: F401` applies it."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """torch.set_num_threads(1) for the module, the previous count restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

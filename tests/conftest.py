"""Shared pytest setup: the repo root on sys.path, the `slow` marker
(CI runs with -m "not slow")."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "slow: long end-to-end runs; CI runs the short versions only")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a test module of small models (threads only add overhead there, and
    parallel jobs share the cores); the thread count is restored afterwards."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

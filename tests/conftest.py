"""Shared pytest setup: the repo root on sys.path, the `slow` marker
(CI runs with -m "not slow")."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "slow: long end-to-end runs; CI runs the short versions only")

"""Test set-up: hooks and fixtures (the helpers live in tests/helpers.py). Triton runs in its CPU
interpreter when no GPU is present; that must be decided before triton is imported anywhere."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pmf_fast.selftest import interpreter_problem  # noqa: E402


def pytest_configure(config):
    """Every interpreted kernel fails with triton < 3.8 and numpy >= 2.4: one line with the remedy
    instead of dozens of TypeErrors from inside the interpreter."""
    problem = interpreter_problem()
    if problem:
        raise pytest.UsageError(problem)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip without CUDA, with the marker's reason (pytest.ini registers it)."""
    if torch.cuda.is_available():
        return
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=marker.kwargs.get("reason", "needs a CUDA GPU")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

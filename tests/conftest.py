"""Shared test helpers. Triton runs in its CPU interpreter when no GPU is present; that must be
decided before triton is imported anywhere."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# the tolerance rule and the test model's wake-up have one home, the package's self-test
from pmf_fast.selftest import ATOL, error_bound, interpreter_problem, max_err, wake_up  # noqa: E402,F401


def assert_close_by_rule(out, ref64, eager_same_dtype, name="output", factor=2.0, relative_atol=False):
    """Fast-path error against an fp64 reference must be at most `factor` x the error of the same
    eager computation in the same dtype, plus an atol for the dtype (times max|ref| when
    relative_atol, for tensors far from unit scale such as gradients). Prints the errors."""
    err, base, bound = error_bound(out, ref64, eager_same_dtype, factor, relative_atol)
    print(f"{name}: err {err:.3e}, eager err {base:.3e}, bound {bound:.3e}")
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x eager error {base:.3e} + atol"


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

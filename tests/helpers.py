"""Helpers the tests import (fixtures and hooks live in conftest.py): the tolerance rule of
DESIGN.md, whose one home is the package's self-test, and the test model's wake-up."""
from pmf_fast.selftest import ATOL, error_bound, max_err, wake_up  # noqa: F401


def assert_close_by_rule(out, ref64, eager_same_dtype, name="output", factor=2.0, relative_atol=False):
    """Fast-path error against an fp64 reference must be at most `factor` x the error of the same
    eager computation in the same dtype, plus an atol for the dtype (times max|ref| when
    relative_atol, for tensors far from unit scale such as gradients). Prints the errors."""
    err, base, bound = error_bound(out, ref64, eager_same_dtype, factor, relative_atol)
    print(f"{name}: err {err:.3e}, eager err {base:.3e}, bound {bound:.3e}")
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x eager error {base:.3e} + atol"

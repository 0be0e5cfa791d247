"""Shared test helpers. Triton runs in its CPU interpreter when no GPU is present; that must be
decided before triton is imported anywhere."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# atol added to the error bound, per dtype (flash-attention's rule)
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_close_by_rule(out, ref64, eager_same_dtype, name="output", factor=2.0, relative_atol=False):
    """Fast-path error against an fp64 reference must be at most `factor` x the error of the same
    eager computation in the same dtype, plus an atol for the dtype (times max|ref| when
    relative_atol, for tensors far from unit scale such as gradients). Prints the errors."""
    err, base = max_err(out, ref64), max_err(eager_same_dtype, ref64)
    bound = factor * base + ATOL[out.dtype] * (ref64.abs().max().item() if relative_atol else 1.0)
    print(f"{name}: err {err:.3e}, eager err {base:.3e}, bound {bound:.3e}")
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x eager error {base:.3e} + atol"


@torch.no_grad()
def wake_up(model, std=0.3):
    """Randomise the zero-initialised residual gates and final layers, so that every block and
    head affects the output (at init the network is the identity on its tokens and outputs 0)."""
    for n, p in model.named_parameters():
        if "scale" in n or "final_layer.linear" in n:
            p.normal_(0, std)
    return model


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

"""The one home of the Triton import guard and of the decision to launch a kernel.

Triton is Linux-only and its CPU interpreter is chosen by TRITON_INTERPRET=1, set before triton is
imported (tests/conftest.py does). Without a GPU and without the interpreter, every op in kernels/
falls back to its eager `*_ref`.
"""
import os

try:
    import triton
    import triton.language as tl
except ImportError:  # the eager references still work
    triton = tl = None


def interpreting() -> bool:
    """Triton runs its CPU interpreter (tiny tiles there: it is slow and checks no GPU limits)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_kernel(t) -> bool:
    """Whether a kernel can run on tensor t: triton present, and t on a GPU or the interpreter on."""
    return triton is not None and (t.is_cuda or interpreting())

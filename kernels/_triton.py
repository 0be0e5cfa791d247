"""The one home of the Triton import guard, of the decision to launch a kernel, and of what every
kernel in kernels/ shares (the exp2-domain constants, the fp32-exact dot).

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


if triton is not None:
    # The softmax runs in the exp2 domain (exp2 is the GPU's native exponential): scores are scaled
    # by LOG2E = log2(e), so exp(x) = exp2(x * LOG2E), and a log-sum-exp kept in log2 units returns
    # to natural log (what torch's flash backward reads) by * LN2 = ln(2). constexpr: a @triton.jit
    # function may read a global only if it is one.
    LOG2E = tl.constexpr(1.4426950408889634)
    LN2 = tl.constexpr(0.6931471805599453)

    @triton.jit
    def dot(a, b, IEEE: tl.constexpr):
        """tl.dot(a, b); with IEEE (set for fp32 inputs) in full fp32 precision, where the GPU's
        default would be TF32 products (about 1e-3 relative error, over the tests' tolerance)."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

"""Attention kernel against its eager reference: outputs, tangents, gradients.
On CPU the Triton kernels run in the interpreter (fp32 and fp16, tiny shapes; bf16 tl.dot is
broken there); the full pMF shapes in bf16 run on a GPU."""
import pytest
import torch

from kernels.attention import attention, attention_jvp, attention_jvp_ref, attention_ref
from tests.conftest import assert_close_by_rule

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
# (B, H, N, D): ragged N (20 + 16 = 36), head dims 80 (pMF-H), 32, 64
CPU_SHAPES = [(1, 2, 36, 80), (2, 1, 20, 32), (1, 1, 37, 64)]
GPU_SHAPES = [(4, 12, 276, 64), (2, 16, 276, 80), (2, 4, 333, 128), (2, 8, 276, 32)]
SHAPES = GPU_SHAPES if GPU else CPU_SHAPES
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])


def make(shape, dtype, n=6):
    return [torch.randn(shape, device=DEV, dtype=torch.float64).to(dtype) for _ in range(n)]


def jvp_ref64(q, k, v, qd, kd, vd):
    """torch.func.jvp of the eager attention in fp64: an independent tangent reference."""
    f = lambda a, b, c: attention_ref(a, b, c)
    return torch.func.jvp(f, (q.double(), k.double(), v.double()), (qd.double(), kd.double(), vd.double()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_tangent(shape, dtype):
    q, k, v, qd, kd, vd = make(shape, dtype)
    o, od = attention_jvp(q, k, v, qd, kd, vd)
    o64, od64 = jvp_ref64(q, k, v, qd, kd, vd)
    eo, eod = attention_jvp_ref(q, k, v, qd, kd, vd)       # the eager path in the same dtype
    assert o.dtype == od.dtype == dtype and o.shape == od.shape == q.shape
    assert_close_by_rule(o, o64, eo, "o")
    assert_close_by_rule(od, od64, eod, "o_dot")
    assert_close_by_rule(attention(q, k, v), o64, attention_ref(q, k, v), "o (plain forward)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_tangent_reproduces_plain_forward(dtype):
    q, k, v = make(SHAPES[0], dtype, 3)
    z = torch.zeros_like(q)
    o, od = attention_jvp(q, k, v, z, z, z)
    assert torch.equal(o, attention(q, k, v))
    assert od.abs().max() == 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients(shape, dtype):
    q, k, v, qd, kd, vd = make(shape, dtype)
    do = torch.randn_like(q)

    def grads(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        out = fn(*xs)
        out = out[0] if isinstance(out, tuple) else out
        return torch.autograd.grad(out, xs, do.to(out.dtype))

    g64 = grads(attention_ref, q.double(), k.double(), v.double())
    g_eager = grads(attention_ref, q, k, v)
    for name, fn in (("attention", attention),
                     ("attention_jvp", lambda a, b, c: attention_jvp(a, b, c, qd, kd, vd))):
        g = grads(fn, q, k, v)
        for gi, ri, ei, n in zip(g, g64, g_eager, "qkv"):
            assert_close_by_rule(gi, ri, ei, f"{name} d{n}")


def test_tangent_is_not_differentiable():
    q, k, v, qd, kd, vd = (t.requires_grad_() for t in make(SHAPES[0], torch.float32))
    o, od = attention_jvp(q, k, v, qd, kd, vd)
    assert o.requires_grad and not od.requires_grad


def test_bad_inputs():
    q = torch.randn(1, 2, 8, 16, device=DEV)
    with pytest.raises(ValueError, match=r"\[B, H, N, D\]"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="share shape"):
        attention(q, q, q[..., :8].contiguous())


def test_compiles_fullgraph():
    q, k, v, qd, kd, vd = make(SHAPES[0], torch.float32)
    fn = torch.compile(lambda *a: attention_jvp(*a), fullgraph=True, backend="aot_eager")
    o, od = fn(q, k, v, qd, kd, vd)
    eo, eod = attention_jvp(q, k, v, qd, kd, vd)
    assert torch.allclose(o, eo, atol=1e-6) and torch.allclose(od, eod, atol=1e-6)


def test_kernel_path_is_taken():
    """Guards the tests above against silently comparing the reference with itself."""
    from kernels.attention import _use_kernel
    assert _use_kernel(torch.empty(1, device=DEV))

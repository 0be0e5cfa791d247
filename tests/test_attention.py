"""Attention kernel against its eager reference: outputs, tangents, gradients.
On CPU the Triton kernels run in the interpreter (fp32 and fp16, tiny shapes; bf16 tl.dot is
broken there); the full pMF shapes in bf16 run on a GPU."""
import pytest
import torch

from pmf_fast.kernels.attention import (
    BACKWARDS,
    _dim_blocks,
    _fwd,
    attention,
    attention_bwd,
    attention_jvp,
    attention_jvp_ref,
    attention_ref,
    default_backward,
)
from pmf_fast.selftest import TANGENT_FACTOR
from tests.helpers import assert_close_by_rule

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
# (B, H, N, D): ragged N (20 + 16 = 36, 37), head dims 80 (pMF-H: 64 + 16 split), 32, 64, 48 (32 + 16)
CPU_SHAPES = [(1, 2, 36, 80), (2, 1, 20, 32), (1, 1, 37, 64), (1, 1, 37, 80), (1, 1, 20, 48)]
GPU_SHAPES = [(4, 12, 276, 64), (2, 16, 276, 80), (2, 4, 333, 128), (2, 8, 276, 32)]
SHAPES = GPU_SHAPES if GPU else CPU_SHAPES
BWD_SHAPES = GPU_SHAPES[:2] if GPU else CPU_SHAPES     # on a GPU: pMF's two head dims (each one compiles)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])


def make(shape, dtype, n=6):
    return [torch.randn(shape, device=DEV, dtype=torch.float64).to(dtype) for _ in range(n)]


# the tangent's factor (3x the eager error in fp16/bf16) and its reason: pmf_fast/selftest.py TANGENT_FACTOR


def jvp_ref64(q, k, v, q_dot, k_dot, v_dot):
    """torch.func.jvp of the eager attention in fp64: an independent tangent reference."""
    f = lambda a, b, c: attention_ref(a, b, c)
    return torch.func.jvp(f, (q.double(), k.double(), v.double()), (q_dot.double(), k_dot.double(), v_dot.double()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_tangent(shape, dtype):
    q, k, v, q_dot, k_dot, v_dot = make(shape, dtype)
    o, o_dot = attention_jvp(q, k, v, q_dot, k_dot, v_dot)
    o64, o_dot64 = jvp_ref64(q, k, v, q_dot, k_dot, v_dot)
    eo, eo_dot = attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot)       # the eager path in the same dtype
    assert o.dtype == o_dot.dtype == dtype and o.shape == o_dot.shape == q.shape
    assert_close_by_rule(o, o64, eo, "o")
    assert_close_by_rule(o_dot, o_dot64, eo_dot, "o_dot", factor=TANGENT_FACTOR[dtype])
    assert_close_by_rule(attention(q, k, v), o64, attention_ref(q, k, v), "o (plain forward)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_tangent_reproduces_plain_forward(dtype):
    q, k, v = make(SHAPES[0], dtype, 3)
    z = torch.zeros_like(q)
    o, o_dot = attention_jvp(q, k, v, z, z, z)
    assert torch.equal(o, attention(q, k, v))
    assert o_dot.abs().max() == 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients(shape, dtype):
    q, k, v, q_dot, k_dot, v_dot = make(shape, dtype)
    do = torch.randn_like(q)

    def grads(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        out = fn(*xs)
        out = out[0] if isinstance(out, tuple) else out
        return torch.autograd.grad(out, xs, do.to(out.dtype))

    g64 = grads(attention_ref, q.double(), k.double(), v.double())
    g_eager = grads(attention_ref, q, k, v)
    for name, fn in (("attention", attention),
                     ("attention_jvp", lambda a, b, c: attention_jvp(a, b, c, q_dot, k_dot, v_dot))):
        g = grads(fn, q, k, v)
        for gi, ri, ei, n in zip(g, g64, g_eager, "qkv"):
            assert_close_by_rule(gi, ri, ei, f"{name} d{n}")


def grads64_and_eager(shape, dtype):
    """Inputs, dO, and the gradients of the eager reference in fp64 and in the same dtype."""
    q, k, v = make(shape, dtype, 3)
    do = torch.randn_like(q)

    def grads(*xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        return torch.autograd.grad(attention_ref(*xs), xs, do.to(xs[0].dtype))

    return (q, k, v, do), grads(q.double(), k.double(), v.double()), grads(q, k, v)


@pytest.mark.parametrize("variant", BACKWARDS)
@pytest.mark.parametrize("shape", BWD_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_variants(variant, shape, dtype):
    """Every backward variant, fed with our forward's O and LSE, against the fp64 reference. On a GPU
    "torch_flash" runs PyTorch's CUDA flash backward (fp16/bf16 only); on CPU it runs torch's CPU flash
    backward from the same O and LSE, which checks that our LSE has the convention torch's fused
    backwards read (natural log, [B, H, N], unpadded)."""
    if variant == "torch_flash" and GPU and dtype == torch.float32:
        pytest.skip("FA2's backward takes fp16/bf16 only (fp32 runs the Triton backward)")
    (q, k, v, do), g64, g_eager = grads64_and_eager(shape, dtype)
    o, _, lse = _fwd(q, k, v)
    g = attention_bwd(do, q, k, v, o, lse, variant)
    for gi, ri, ei, n in zip(g, g64, g_eager, "qkv"):
        assert gi.shape == ri.shape and gi.dtype == dtype
        assert_close_by_rule(gi, ri, ei, f"{variant} d{n}")


@pytest.mark.gpu(reason="the CUDA flash-attention backward needs a CUDA GPU (sm80+)")
@pytest.mark.parametrize("D", [64, 80])
def test_torch_flash_backward_on_gpu(D):
    """pMF's shapes in bf16 through the CUDA flash backward; our LSE equals the one torch's own flash
    forward returns (so feeding it ours is exact), and the default backward here is torch_flash."""
    shape = (2, 12, 276, D)
    (q, k, v, do), g64, g_eager = grads64_and_eager(shape, torch.bfloat16)
    o, _, lse = _fwd(q, k, v)
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)
    assert out[1].shape == lse.shape
    torch.testing.assert_close(lse, out[1], atol=2e-2, rtol=0)    # bf16 scores: both round q.k
    assert default_backward(q) == "torch_flash"
    for gi, ri, ei, n in zip(attention_bwd(do, q, k, v, o, lse, "torch_flash"), g64, g_eager, "qkv"):
        assert_close_by_rule(gi, ri, ei, f"torch_flash d{n}")


@pytest.mark.parametrize("D", [64, 80])
def test_torch_flash_backward_call_fits_this_torch(D):
    """The CUDA call of the torch_flash backward (an aten op with a private, version-dependent
    schema) is accepted by the installed torch, on any machine: fake CUDA tensors run the op's shape
    function instead of FA2. v and dO come strided, as the model passes them (transposes of
    [B, N, H, D]); the op's own flash forward declares the LSE layout that we store."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pmf_fast.kernels.attention import _bwd_torch_flash
    B, H, N = 2, 3, 276
    with FakeTensorMode():
        q, k, o = (torch.empty(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        v, do = (torch.empty(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        lse = torch.empty(B, H, N, device="cuda", dtype=torch.float32)
        grads = _bwd_torch_flash(do, q, k, v, o, lse)
        fwd_lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[1]
    assert fwd_lse.shape == lse.shape and fwd_lse.dtype == lse.dtype
    for g in grads:
        assert g.shape == (B, H, N, D) and g.dtype == torch.bfloat16 and g.device.type == "cuda"
        assert g.is_contiguous()                  # what the custom op's fake declares


def test_lse_matches_torch_flash_forward():
    """Our saved log-sum-exp is torch's flash forward's, on whichever device runs (CUDA or CPU)."""
    dtype = torch.bfloat16 if GPU else torch.float32
    q, k, v = make(SHAPES[0], dtype, 3)
    lse = _fwd(q, k, v)[2]
    ref = (torch.ops.aten._scaled_dot_product_flash_attention(q, k, v) if GPU
           else torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v))[1]
    assert lse.dtype == torch.float32 and lse.is_contiguous() and lse.shape == ref.shape
    torch.testing.assert_close(lse, ref.float(), atol=2e-2 if GPU else 1e-5, rtol=0)


def test_default_backward():
    q = torch.zeros(1, 1, 4, 16, device=DEV, dtype=torch.float32)
    assert default_backward(q) == "triton"                       # fp32 and CPU: never FA2
    with pytest.raises(ValueError, match="unknown attention backward"):
        attention_bwd(q, q, q, q, q, q[..., 0], "cudnn")


def test_head_dim_split():
    """Not-power-of-two head dims run as a head tile plus a tail tile, never padded to the next
    power of two: D = 80 does 80 columns of work, not 128."""
    assert _dim_blocks(64) == (64, 0) and _dim_blocks(128) == (128, 0)
    assert _dim_blocks(80) == (64, 16) and _dim_blocks(96) == (64, 32) and _dim_blocks(48) == (32, 16)
    assert _dim_blocks(8) == (16, 0) and _dim_blocks(72) == (64, 16)
    with pytest.raises(ValueError, match="head dim"):
        _dim_blocks(160)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pmf_length_head_dim_80(dtype):
    """N = 276 (pMF's 20 + 256 tokens) at D = 80, batch 1: tangent and every gradient."""
    shape = (1, 1, 276, 80)
    q, k, v, q_dot, k_dot, v_dot = make(shape, dtype)
    o, o_dot = attention_jvp(q, k, v, q_dot, k_dot, v_dot)
    o64, o_dot64 = jvp_ref64(q, k, v, q_dot, k_dot, v_dot)
    eo, eo_dot = attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot)
    assert_close_by_rule(o, o64, eo, "o")
    assert_close_by_rule(o_dot, o_dot64, eo_dot, "o_dot", factor=TANGENT_FACTOR[dtype])
    (q, k, v, do), g64, g_eager = grads64_and_eager(shape, dtype)
    o, _, lse = _fwd(q, k, v)
    for variant in ("triton", "triton_onepass"):
        for gi, ri, ei, n in zip(attention_bwd(do, q, k, v, o, lse, variant), g64, g_eager, "qkv"):
            assert_close_by_rule(gi, ri, ei, f"{variant} d{n}")


def test_tangent_is_not_differentiable():
    q, k, v, q_dot, k_dot, v_dot = (t.requires_grad_() for t in make(SHAPES[0], torch.float32))
    o, o_dot = attention_jvp(q, k, v, q_dot, k_dot, v_dot)
    assert o.requires_grad and not o_dot.requires_grad


def test_bad_inputs():
    q = torch.randn(1, 2, 8, 16, device=DEV)
    with pytest.raises(ValueError, match=r"\[B, H, N, D\]"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="share shape"):
        attention(q, q, q[..., :8].contiguous())


def test_compiles_fullgraph():
    q, k, v, q_dot, k_dot, v_dot = make(SHAPES[0], torch.float32)
    fn = torch.compile(lambda *a: attention_jvp(*a), fullgraph=True, backend="aot_eager")
    o, o_dot = fn(q, k, v, q_dot, k_dot, v_dot)
    eo, eo_dot = attention_jvp(q, k, v, q_dot, k_dot, v_dot)
    assert torch.allclose(o, eo, atol=1e-6) and torch.allclose(o_dot, eo_dot, atol=1e-6)


def test_kernel_path_is_taken():
    """Guards the tests above against silently comparing the reference with itself."""
    from pmf_fast.kernels._triton import use_kernel
    assert use_kernel(torch.empty(1, device=DEV))

"""Fused patch embedding against the two convolutions: values, tangents, weight gradients."""
import pytest
import torch

from pmf_fast.kernels.patch_embed import patch_embed, patch_embed_jvp, patch_embed_ref
from pmf_fast.layers import BottleneckPatchEmbedder
from tests.helpers import assert_close_by_rule

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
# (B, C, image, patch, r, D): patch sizes 2 and 4 with odd widths on CPU; pMF shapes on GPU
CASES = ([(2, 3, 8, 2, 8, 24), (1, 3, 12, 4, 16, 40)] if not GPU else
         [(16, 3, 256, 16, 128, 768), (8, 3, 512, 32, 128, 768), (4, 3, 256, 16, 256, 1280),
          (2, 3, 1024, 64, 128, 768)])
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])


def make(case, dtype, channels_last=False):
    B, C, S, p, r, D = case
    emb = BottleneckPatchEmbedder(S, p, C, r, D).to(DEV)
    with torch.no_grad():
        emb.proj1.bias.normal_()
        emb.proj2.bias.normal_()
    x = torch.randn(B, C, S, S, device=DEV, dtype=dtype)
    x_dot = torch.randn_like(x)
    if channels_last:
        x, x_dot = x.contiguous(memory_format=torch.channels_last), x_dot.contiguous(memory_format=torch.channels_last)
    w = [t.detach().to(dtype) for t in (emb.proj1.weight, emb.proj1.bias, emb.proj2.weight, emb.proj2.bias)]
    return x, x_dot, w, emb


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_values_and_tangent(case, dtype, channels_last):
    x, x_dot, w, _ = make(case, dtype, channels_last)
    w64 = [t.double() for t in w]
    ref, ref_dot = patch_embed_ref(x.double(), *w64), patch_embed_ref(x_dot.double(), w64[0], None, w64[2], None)
    y, y_dot = patch_embed_jvp(x, x_dot, *w)
    assert y.shape == ref.shape and y.dtype == dtype
    if dtype == torch.float32 or GPU:
        eager = patch_embed_ref(x, *w)
    else:
        eager = patch_embed_ref(x.float(), *[t.float() for t in w]).to(dtype)
    eager_dot = (patch_embed_ref(x_dot, w[0], None, w[2], None) if dtype == torch.float32 or GPU else
                 patch_embed_ref(x_dot.float(), w[0].float(), None, w[2].float(), None).to(dtype))
    assert_close_by_rule(y, ref, eager, "y")
    assert_close_by_rule(y_dot, ref_dot, eager_dot, "y_dot")
    assert torch.equal(patch_embed(x, *w), y)


@pytest.fixture
def no_tf32():
    """fp32 products in full precision in both the reference (cuDNN: TF32 by default, ~1e-3 off) and
    the op's cuBLAS backward (train.py turns TF32 on for matmuls: a test that ran train.main earlier
    in the same process would leave it on)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def test_weight_gradients_match_the_model_convs(no_tf32):
    case = CASES[0]
    x, x_dot, _, emb = make(case, torch.float32)
    dy = torch.randn(x.shape[0], (x.shape[-1] // case[3]) ** 2, case[5], device=DEV)
    params = [emb.proj1.weight, emb.proj1.bias, emb.proj2.weight, emb.proj2.bias]
    ref = torch.autograd.grad(emb(x), params, dy)
    for fn in (lambda: patch_embed(x, *params), lambda: patch_embed_jvp(x, x_dot, *params)[0]):
        got = torch.autograd.grad(fn(), params, dy)
        for g, r in zip(got, ref):
            assert torch.allclose(g, r, rtol=1e-4, atol=1e-4), (g - r).abs().max()
    _, y_dot = patch_embed_jvp(x, x_dot, *params)
    assert not y_dot.requires_grad


def test_bad_shapes():
    x, _, w, _ = make(CASES[0], torch.float32)
    with pytest.raises(ValueError, match="divisible"):
        patch_embed(x[..., :7, :7], *w)
    with pytest.raises(ValueError, match="x_dot"):
        patch_embed_jvp(x, x[:1], *w)


def test_kernel_path_is_taken():
    from pmf_fast.kernels._triton import use_kernel
    assert use_kernel(torch.empty(1, device=DEV))

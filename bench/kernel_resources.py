"""What every Triton launch of the fast path costs a GPU, found without one.

Triton compiles ahead of time for a named target, and its wheel ships ptxas and cuobjdump, so on
any machine (CI's CPU included) each kernel is compiled for sm_90 (H100, H200) exactly as the GPU
would compile it: the launchers of kernels/ run on meta tensors with their kernels swapped for a
recorder, so the tile sizes, warps and stages checked are the ones the GPU gets, never a copy.
Per launch this reports registers per thread, the spill stack (bytes per thread that did not fit
in registers: local-memory traffic inside the loop) and shared memory against the card's limit.

    python -m bench.kernel_resources                 the bf16 launches of the pMF presets, a line each;
                                                     exit status 1 naming each launch that does not fit
    python -m bench.kernel_resources --all-dtypes    fp16 and fp32 as well (what the GPU tests launch)
    python -m bench.kernel_resources --sweep         also attention at other tile sizes: the candidates
                                                     that bench_attention.py then times on a GPU

Static resources are not speed: they explain a slow kernel (a spilling tile) and rule out one that
cannot launch (shared memory over the limit), and bench/bench_attention.py times what is left.
tests/test_kernel_resources.py holds every default launch to: compiles, fits, does not spill (bf16,
fp16). Run it without TRITON_INTERPRET=1 (that makes the kernels interpreted functions).
"""
import argparse
import contextlib
import os
import subprocess
import tempfile

import torch

import kernels.attention as attention
import kernels.newton_schulz as newton_schulz
import kernels.patch_embed as patch_embed

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl
except ImportError:
    triton = None

ARCH = 90                       # the default target: sm_90, H100 and H200
# Bytes of shared memory one block may use (CUDA's per-block opt-in maximum) per compute capability:
# A100 163 KiB, RTX 30xx / L4 / L40 99 KiB, H100 / H200 227 KiB.
SHARED_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
SHARED_LIMIT = SHARED_LIMITS[ARCH]
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32"}


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kw)` records the call."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((self.fn, args, kw))


@contextlib.contextmanager
def recording(module):
    """Within: every kernel of `module` records its launches into the yielded list."""
    calls, saved = [], {}
    for name, obj in vars(module).items():
        if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel"):
            saved[name] = obj
    try:
        for name, fn in saved.items():
            setattr(module, name, _Recorder(fn, calls))
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def launches(dtypes=(torch.bfloat16,)):
    """(label, kernel, args, kwargs) of every launch that pMF-B/16, L/16 and H/16 training and Muon
    make, per dtype. Runs the real launchers on meta tensors (nothing is computed)."""
    out = []
    B, N = 128, 276                                         # pMF/16: 20 conditioning tokens + 256 patches
    for dtype in dtypes:
        for D, H in ((64, 12), (80, 16)):                   # B/16, L/16: head dim 64; H/16: 80
            q = _meta(B, H, N, D, dtype=dtype)
            with recording(attention) as calls:
                attention._fwd(q, q, q)
                attention._fwd(q, q, q, q, q, q)
                attention._bwd_triton(q, q, q, q, q, _meta(B, H, N, dtype=torch.float32))
                attention._bwd_triton(q, q, q, q, q, _meta(B, H, N, dtype=torch.float32), onepass=True)
            names = ("forward", "forward+tangent", "backward dK dV", "backward dQ", "backward one-pass")
            out += [(f"attention {n} D={D} {TYPES[dtype]}", *c) for n, c in zip(names, calls)]
        for r, Dm in ((128, 768), (256, 1280)):            # B/16: bottleneck 128; H/16: 256
            x = _meta(B, 3, 256, 256, dtype=dtype)
            w1, w2, b = _meta(r, 3, 16, 16, dtype=dtype), _meta(Dm, r, 1, 1, dtype=dtype), _meta(r, dtype=dtype)
            with recording(patch_embed) as calls:
                patch_embed._launch(x, x, w1, b, w2, _meta(Dm, dtype=dtype))
            out += [(f"patch embed image+tangent r={r} D={Dm} {TYPES[dtype]}", *c) for c in calls]
        X = _meta(24, 768, 768, dtype=dtype)                # Muon on B/16's 768 x 768 matrices
        with recording(newton_schulz) as calls:
            newton_schulz._sym_gram(X)
            newton_schulz._sym_gram(X, X, alpha=2.0, beta=-4.7)
        out += [(f"Newton-Schulz {n} 768 {TYPES[dtype]}", *c) for n, c in zip(("X X^T", "b A + c A^2"), calls)]
    return out


def _signature(fn, args, kw):
    """Triton's signature, constants and attributes for a call, by the JIT's own specialiser: a
    pointer or an integer divisible by 16 is marked so, an integer 1 becomes a constant (meta
    tensors have address 0: aligned, as torch's allocations are)."""
    sig, const, attrs = {}, {}, {}
    values = dict(zip(fn.arg_names, args), **kw)
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name], const[(i,)] = "constexpr", v
            continue
        kind, spec = native_specialize_impl(CUDABackend, v, False, not p.do_not_specialize,
                                            not p.do_not_specialize_on_alignment)
        sig[p.name] = kind
        if kind == "constexpr":
            const[(i,)] = spec
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return sig, const, attrs


def compile_launch(fn, args, kw, arch=ARCH, **override):
    """Compile one recorded launch for sm_`arch` (constexprs and num_warps / num_stages may be
    overridden). Returns Triton's compiled kernel (metadata.shared, asm["cubin"], ...)."""
    kw = {**kw, **override}
    sig, const, attrs = _signature(fn, args, kw)
    options = {k: kw[k] for k in ("num_warps", "num_stages") if k in kw}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def resources(kernel):
    """dict(registers, spill, shared): registers per thread, spill stack bytes per thread (cuobjdump's
    STACK: Triton kernels keep no local arrays, so a stack is spilled registers), shared bytes."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(l for l in text.splitlines() if "REG:" in l)
    fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
    return dict(registers=int(fields["REG"]), spill=int(fields["STACK"]), shared=kernel.metadata.shared)


def problems(label, res, arch=ARCH):
    """What is wrong with a launch's resources: shared memory over the limit (it cannot launch), or
    spilled registers in a training dtype (bf16, fp16; fp32 runs only in the tests)."""
    out, limit = [], SHARED_LIMITS[arch]
    if res["shared"] > limit:
        out.append(f"{res['shared'] / 1024:.1f} KiB of shared memory, over sm_{arch}'s {limit / 1024:.0f} KiB "
                   "(OutOfResources at launch): smaller tiles or fewer num_stages")
    if res["spill"] and "fp32" not in label:
        out.append(f"{res['spill']} bytes per thread spilled at {res['registers']} registers: smaller tiles or more warps")
    return out


def row(label, res, kw):
    tiles = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in kw.items() if k.startswith("BLOCK_"))
    return (f"{label:<52} {tiles:<22} warps={kw.get('num_warps', 4)} stages={kw.get('num_stages', 3)}  "
            f"reg={res['registers']:>3} spill={res['spill']:>5} B  shared={res['shared'] / 1024:6.1f} KiB")


def uncovered():
    """Kernels of kernels/ that launches() never launches (each must be checked)."""
    launched = {fn.__name__ for _, fn, _, _ in launches()}
    return sorted(n for m in (attention, patch_embed, newton_schulz) for n, o in vars(m).items()
                  if isinstance(o, triton.runtime.JITFunction) and n.endswith("_kernel") and n not in launched)


# Attention's candidate tiles (BLOCK_M query rows, BLOCK_N keys, warps) for --sweep.
SWEEP = [(bm, bn, w) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8)]


def sweep(dtype=torch.bfloat16, arch=ARCH):
    """Every attention launch at each SWEEP tile: the candidates to time on a GPU."""
    for label, fn, args, kw in launches((dtype,)):
        if label.startswith("attention"):
            for bm, bn, w in SWEEP:
                o = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w)
                try:
                    res = resources(compile_launch(fn, args, kw, arch, **o))
                    print(row(label, res, {**kw, **o}), *problems(label, res, arch), flush=True)
                except Exception as e:                              # e.g. out of registers at compile
                    print(f"{label:<52} {o}: {type(e).__name__}: {str(e).splitlines()[0][:80]}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all-dtypes", action="store_true", help="fp16 and fp32 too (the GPU tests run them), not only bf16")
    ap.add_argument("--sweep", action="store_true", help="also compile attention at each candidate tile size")
    ap.add_argument("--arch", type=int, default=ARCH, choices=sorted(SHARED_LIMITS),
                    help="compute capability to compile for (default 90: H100/H200; 80: A100)")
    a = ap.parse_args()
    if triton is None:
        raise SystemExit("triton is not installed: pip install triton (Linux)")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("TRITON_INTERPRET=1 turns the kernels into interpreted functions, which do not compile "
                         "for a GPU: run without it")
    print(f"triton {triton.__version__}, sm_{a.arch}, shared memory limit {SHARED_LIMITS[a.arch] / 1024:.0f} KiB")
    bad = [f"{n}: never launched by bench/kernel_resources.py launches(): add it there" for n in uncovered()]
    for label, fn, args, kw in launches((torch.bfloat16, torch.float16, torch.float32) if a.all_dtypes else (torch.bfloat16,)):
        res = resources(compile_launch(fn, args, kw, a.arch))
        issues = problems(label, res, a.arch)
        bad += [f"{label}: {p}" for p in issues]
        print(row(label, res, kw), "PROBLEM" if issues else "ok", flush=True)
    if a.sweep:
        sweep(arch=a.arch)
    if bad:
        raise SystemExit("\n".join(["problems:"] + bad))


if __name__ == "__main__":
    main()

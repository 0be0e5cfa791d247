"""What every Triton launch of the fast path costs a GPU, found without one.

Triton compiles ahead of time for a named target, and its wheel ships ptxas and cuobjdump, so on
any machine (CI's CPU included) each kernel is compiled for sm_90 (H100, H200) exactly as the GPU
would compile it: the launchers of kernels/ run on meta tensors with their kernels swapped for a
recorder, so the tile sizes, warps and stages checked are the ones the GPU gets, never a copy.
Per launch this reports registers per thread, the spill stack (bytes per thread that did not fit
in registers: local-memory traffic inside the loop) and shared memory against the card's limit.

    python -m bench.kernel_resources                 the bf16 launches of the pMF presets, a line each;
                                                     exit status 1 naming each launch that does not fit
    python -m bench.kernel_resources --all-dtypes    fp16 and fp32 as well, and attention at head dim
                                                     128 (the pMF shapes the GPU tests launch, and
                                                     their widest head dim)
    python -m bench.kernel_resources --arch 80       for another card (80: A100)
    python -m bench.kernel_resources --sweep         also attention at other tile sizes: the candidates
                                                     that bench_attention.py then times on a GPU

Static resources are not speed: they explain a slow kernel (a spilling tile) and rule out one that
cannot launch (shared memory over the limit), and bench/bench_attention.py times what is left.
tests/test_kernel_resources.py holds every default launch to: compiles, fits on sm_90, and spills
nothing where training runs it (bf16 / fp16 at the pMF shapes). Run it without TRITON_INTERPRET=1
(that makes the kernels interpreted functions).
"""
import argparse
import contextlib
import dataclasses
import os
import subprocess
import tempfile
import typing

import torch

import pmf_fast.kernels.attention as attention
import pmf_fast.kernels.newton_schulz as newton_schulz
import pmf_fast.kernels.patch_embed as patch_embed

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend, CUDAOptions
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl
except ImportError:
    triton = None

ARCH = 90                       # the default target: sm_90, H100 and H200
# Bytes of shared memory one block may use (CUDA's per-block opt-in maximum) per compute capability:
# A100 163 KiB, RTX 30xx / L4 / L40 99 KiB, H100 / H200 227 KiB.
SHARED_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Launch(typing.NamedTuple):
    label: str          # what it is, at which shape and dtype
    fn: object          # the @triton.jit kernel
    args: tuple         # positional arguments as the launcher passed them (meta tensors)
    kw: dict            # keyword arguments: constexprs and launch options
    training: bool      # a launch pMF training makes (bf16/fp16 at a preset's shape): must not spill


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


def _named(names, calls, training):
    assert len(names) == len(calls), f"expected {len(names)} launches, recorded {len(calls)}: update launches()"
    return [Launch(n, *c, training) for n, c in zip(names, calls)]


def _attention(B, H, N, D, dtype, training):
    q, lse = _meta(B, H, N, D, dtype=dtype), _meta(B, H, N, dtype=torch.float32)
    with recording(attention) as calls:
        attention._fwd(q, q, q)
        attention._fwd(q, q, q, q, q, q)
        attention._bwd_triton(q, q, q, q, q, lse)
        attention._bwd_triton(q, q, q, q, q, lse, onepass=True)
    names = ("forward", "forward+tangent", "backward dK dV", "backward dQ", "backward one-pass")
    return _named([f"attention {n} N={N} D={D} {TYPES[dtype]}" for n in names], calls, training)


def launches(dtypes=(torch.bfloat16,)):
    """Every launch that pMF-B/16, L/16 and H/16 training and Muon make, per dtype, and in fp16 and
    fp32 also attention at the GPU tests' widest head dim (128: the most shared memory any head dim
    up to the kernel's limit asks for; not a pMF head dim, so its spills are reported, not
    failures). Runs the real launchers on meta tensors: nothing is computed."""
    out = []
    B, N = 128, 276                                         # pMF/16: 20 conditioning tokens + 256 patches
    for dtype in dtypes:
        training = dtype != torch.float32                   # fp32 runs only in the tests
        out += _attention(B, 12, N, 64, dtype, training)    # B/16, L/16: head dim 64
        out += _attention(B, 16, N, 80, dtype, training)    # H/16: 80
        if dtype != torch.bfloat16:                         # bf16 compiles as fp16 does
            out += _attention(2, 4, 333, 128, dtype, False)   # tests/test_attention.py's GPU shape
        for r, Dm in ((128, 768), (256, 1280)):            # B/16: bottleneck 128; H/16: 256
            x = _meta(B, 3, 256, 256, dtype=dtype)
            w1, w2, b = _meta(r, 3, 16, 16, dtype=dtype), _meta(Dm, r, 1, 1, dtype=dtype), _meta(r, dtype=dtype)
            with recording(patch_embed) as calls:
                patch_embed._launch(x, x, w1, b, w2, _meta(Dm, dtype=dtype))
            out += _named([f"patch embed image+tangent r={r} D={Dm} {TYPES[dtype]}"], calls, training)
        X = _meta(24, 768, 768, dtype=dtype)                # Muon on B/16's 768 x 768 matrices
        with recording(newton_schulz) as calls:
            newton_schulz._sym_gram(X)
            newton_schulz._sym_gram(X, X, alpha=2.0, beta=-4.7)
        out += _named([f"Newton-Schulz {n} 768 {TYPES[dtype]}" for n in ("X X^T", "b A + c A^2")], calls, training)
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


def compile_launch(launch, arch=ARCH, **override):
    """Compile one recorded launch for sm_`arch`, constexprs and options (num_warps, num_stages,
    maxnreg, ...) overridable. Returns Triton's compiled kernel (metadata, asm["cubin"], ...).
    A keyword that is neither a parameter nor an option is an error, as on a GPU."""
    fn, kw = launch.fn, {**launch.kw, **override}
    option_names = {f.name for f in dataclasses.fields(CUDAOptions)}
    unknown = set(kw) - set(fn.arg_names) - option_names
    if unknown:
        raise KeyError(f"{fn.__name__}: keyword arguments {sorted(unknown)} are neither parameters nor options")
    sig, const, attrs = _signature(fn, launch.args, kw)
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    options = {k: v for k, v in kw.items() if k in option_names}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def resources(kernel):
    """dict(registers, spill, shared, num_warps, num_stages) of a compiled kernel: registers per
    thread, spill stack bytes per thread (cuobjdump's STACK: Triton kernels keep no local arrays, so
    a stack is spilled registers), shared memory bytes."""
    tool = triton.knobs.nvidia.cuobjdump.path
    if not tool or not os.path.exists(tool):
        raise SystemExit(f"cuobjdump not found ({tool!r}): the triton wheel ships it; "
                         "or point TRITON_CUOBJDUMP_PATH at one")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    lines = text.splitlines()
    head = next(i for i, l in enumerate(lines) if l.strip() == f"Function {kernel.metadata.name}:")
    fields = dict(tok.split(":", 1) for tok in lines[head + 1].split() if ":" in tok)
    return dict(registers=int(fields["REG"]), spill=int(fields["STACK"]), shared=kernel.metadata.shared,
                num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages)


def problems(launch, res, arch=ARCH):
    """What is wrong with a launch's resources: shared memory over the limit (it cannot launch), or
    spilled registers in a launch training makes."""
    out, limit = [], SHARED_LIMITS[arch]
    if res["shared"] > limit:
        out.append(f"{res['shared'] / 1024:.1f} KiB of shared memory, over sm_{arch}'s {limit / 1024:.0f} KiB "
                   "(OutOfResources at launch): smaller tiles or fewer num_stages")
    if res["spill"] and launch.training:
        out.append(f"{res['spill']} bytes per thread spilled at {res['registers']} registers: "
                   "smaller tiles or more warps")
    return out


def row(launch, res, **override):
    kw = {**launch.kw, **override}
    tiles = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in kw.items() if k.startswith("BLOCK_"))
    return (f"{launch.label:<50} {tiles:<22} warps={res['num_warps']} stages={res['num_stages']}  "
            f"reg={res['registers']:>3} spill={res['spill']:>5} B  shared={res['shared'] / 1024:6.1f} KiB")


def uncovered():
    """Kernels of kernels/ that launches() never launches (each must be checked)."""
    launched = {l.fn.__name__ for l in launches()}
    return sorted(n for m in (attention, patch_embed, newton_schulz) for n, o in vars(m).items()
                  if isinstance(o, triton.runtime.JITFunction) and n.endswith("_kernel") and n not in launched)


# Attention's candidate tiles (BLOCK_M query rows, BLOCK_N keys, warps) for --sweep.
SWEEP = [(bm, bn, w) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8)]


def sweep(arch=ARCH):
    """Every bf16 attention launch at each SWEEP tile: the candidates to time on a GPU."""
    for launch in launches():
        if launch.label.startswith("attention"):
            for bm, bn, w in SWEEP:
                o = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w)
                try:
                    res = resources(compile_launch(launch, arch, **o))
                    print(row(launch, res, **o), *problems(launch, res, arch), flush=True)
                except Exception as e:                              # e.g. out of registers at compile
                    print(f"{launch.label:<50} {o}: {type(e).__name__}: {str(e).splitlines()[0][:80]}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all-dtypes", action="store_true",
                    help="fp16 and fp32 too, and attention at head dim 128 (the GPU tests run them)")
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
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if a.all_dtypes else (torch.bfloat16,)
    for launch in launches(dtypes):
        res = resources(compile_launch(launch, a.arch))
        issues = problems(launch, res, a.arch)
        bad += [f"{launch.label}: {p}" for p in issues]
        print(row(launch, res), "PROBLEM" if issues else "ok", flush=True)
    if a.sweep:
        sweep(arch=a.arch)
    if bad:
        raise SystemExit("\n".join(["problems:"] + bad))


if __name__ == "__main__":
    main()

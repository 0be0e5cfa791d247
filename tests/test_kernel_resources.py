"""Every launch of kernels/ that pMF training and the GPU tests make, compiled for sm_90 on this
machine (bench/kernel_resources.py): it compiles, its shared memory fits the card, and nothing that
training runs spills.

No GPU is needed: Triton compiles ahead of time and its wheel ships ptxas and cuobjdump. It finds,
without a GPU, a launch such as the fp32 patch embedding at r = 256 with [256, 64] w2 tiles and 3
stages: 304 KiB of shared memory, which an H200 refuses to launch. The tool runs in a child process: the tests here
run with TRITON_INTERPRET=1, under which Triton's kernels are interpreted functions that do not
compile for a GPU."""
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow                  # process launches or compiles: not the fast lane

pytest.importorskip("triton", reason="triton is Linux-only: there is nothing to compile without it")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, code=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = ([sys.executable, "-c", textwrap.dedent(code)] if code else
           [sys.executable, "-m", "bench.kernel_resources", *args])
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_every_default_launch_fits_sm90():
    """bf16, fp16 and fp32 launches of attention, patch embedding and Newton-Schulz at the pMF
    shapes (and attention at head dim 128): none over 227 KiB of shared memory, none spilling in
    bf16/fp16 at pMF shapes, every kernel launched."""
    p = run(["--all-dtypes"])
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [l for l in p.stdout.splitlines() if l.endswith(" ok")]
    assert len(rows) == 3 * 14 + 2 * 5, p.stdout      # 14 pMF launches per dtype, 5 at D = 128 in fp16/fp32
    assert any(l.startswith("patch embed image+tangent r=256 D=1280 fp32") for l in rows)


def test_check_flags_the_launch_that_failed_on_a_gpu():
    """The patch-embedding tiles that failed on an H200 (fp32, r = 256, [256, 64] w2 tiles, 3
    stages) are flagged over the limit, a spilling bf16 attention tile is flagged too, and a
    misspelt option is an error: the check can fail, and agrees with the GPU where it has spoken."""
    p = run([], code="""
        import torch
        from bench import kernel_resources as kr
        launches = {l.label: l for l in kr.launches((torch.bfloat16, torch.float32))}
        patch = launches["patch embed image+tangent r=256 D=1280 fp32"]
        res = kr.resources(kr.compile_launch(patch, BLOCK_N=64, num_stages=3))
        print("patch", res["shared"], kr.problems(patch, res))
        attn = launches["attention forward+tangent N=276 D=64 bf16"]
        res = kr.resources(kr.compile_launch(attn, BLOCK_M=128, BLOCK_N=64, num_warps=4))
        print("attention", res["spill"], kr.problems(attn, res))
        try:
            kr.compile_launch(attn, num_warp=8)
        except KeyError as e:
            print("typo", e)
    """)
    assert p.returncode == 0, p.stdout + p.stderr
    patch, attn = p.stdout.splitlines()[-3:-1]
    assert patch.startswith("patch ") and int(patch.split()[1]) > 227 * 1024 and "over sm_90" in patch, patch
    assert attn.startswith("attention ") and int(attn.split()[1]) > 0 and "spilled" in attn, attn
    assert "num_warp" in p.stdout.splitlines()[-1]


def test_refuses_the_interpreter():
    p = subprocess.run([sys.executable, "-m", "bench.kernel_resources"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT})
    assert p.returncode != 0 and "TRITON_INTERPRET=1" in p.stderr

"""bench/gpu_check.sh and bench/report.py without a GPU: the report renders (one separator cell per
header cell, p20/p50/p80, every stage and failure), and a check killed partway still writes its
report with the rows measured before the kill (PMF_GPU_CHECK_DRY=1: smoke shapes on the CPU)."""
import json
import os
import signal
import subprocess
import time

import pytest

from bench import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROWS = [
    {"group": "attention bwd", "name": "(128, 12, 276, 64) torch_flash", "ms": 1.5, "unit": "ms", "p20_ms": 1.4,
     "p80_ms": 1.6, "tflops": 150.0, "baseline": "SDPA backward", "baseline_ms": 1.5, "baseline_p20_ms": 1.45,
     "baseline_p80_ms": 1.55, "baseline_tflops": 150.0, "speedup": 1.0, "device": "NVIDIA H200"},
    {"group": "train step", "name": "pMF-B/16 fast (batch 128)", "ms": 200.0, "unit": "ms", "images_per_s": 640.0,
     "mfu": 0.41, "device": "NVIDIA H200"},
]
LOG = """=== train step: pMF-B/16 (limit 170 s)
.. [100%]
2 passed in 80.10s
=== exit 0 after 85 s
=== GPU tests: tests/test_patch_embed.py (limit 25 s)
..F.F
FAILED tests/test_patch_embed.py::test_values_and_tangent[False-dtype0-case2] - AssertionError: o: error 1.2e-02
FAILED tests/test_patch_embed.py::test_weight_gradients_match_the_model_convs - AssertionError: dw1
2 failed, 3 passed in 20.00s
=== exit 1 after 22 s
=== GPU tests: tests/test_fast_step.py (limit 45 s)
tests/test_fast_step.py::test_a PASSED
tests/test_fast_step.py::test_b === exit 124 after 45 s
=== GPU tests: tests/test_attention.py (limit 0 s)
=== exit 124 after 0 s
=== train step: pMF-L/16 or pMF-H/16 (limit 30 s)
...
"""


def test_report_from_partial_files(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + '{"group": "attention fwd", "na')  # cut off
    log = tmp_path / "check.log"
    log.write_text(LOG)
    md = report.main(str(rows), str(log), str(tmp_path / "out"), status="killed (SIGTERM) during: x", seconds=300)
    assert md == (tmp_path / "out.md").read_text()
    table = [l for l in md.splitlines() if l.startswith("|")]
    header, separator = table[0], table[1]
    assert header.count("|") == separator.count("|") == len(report.COLUMNS) + 2
    assert "| median | p20 | p80 |" in header
    assert "| 1.5 | 1.4 | 1.6 |" in table[2] and "images_per_s=640.0, mfu=0.41" in table[3]
    assert "Status: killed (SIGTERM) during: x after 300 s" in md
    assert "| train step: pMF-B/16 | 170 | 2 passed in 80.10s |" in md
    assert "| GPU tests: tests/test_patch_embed.py | 25 | 2 failed, 3 passed in 20.00s |" in md
    assert "timed out after 45 s (limit 45 s)" in md
    assert "| GPU tests: tests/test_attention.py | 0 | skipped: the time budget was spent |" in md
    assert "| train step: pMF-L/16 or pMF-H/16 | 30 | cut short: the check was stopped during this stage |" in md
    assert "Failures (2):" in md
    assert "test_values_and_tangent[False-dtype0-case2] - AssertionError: o: error 1.2e-02" in md
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["results"] == ROWS and len(saved["stages"]) == 5 and saved["meta"]["status"].startswith("killed")


@pytest.mark.slow
def test_check_writes_its_report_when_killed(tmp_path):
    """SIGTERM to the check (as `timeout` sends it) once a row is written: the report holds that row."""
    env = dict(os.environ, PMF_GPU_CHECK_DRY="1", PMF_RESULTS_DIR=str(tmp_path), PMF_GPU_CHECK_SECONDS="300")
    env.pop("OUT", None)
    proc = subprocess.Popen(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        rows = []
        while not rows and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            files = list(tmp_path.glob("*.jsonl"))
            rows = [l for l in files[0].read_text().splitlines() if l.endswith("}")] if files else []
        assert rows, "the dry check wrote no row"
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out
    md = next(tmp_path.glob("*.md")).read_text()
    assert "Status: killed (SIGTERM) during: " in md, md
    for r in map(json.loads, rows):
        assert r["name"] in md


def test_report_needs_no_git(tmp_path, monkeypatch):
    """The GPU machine has no git and its copy of the tree no .git: the commit comes from
    $PMF_COMMIT, else bench/results/COMMIT, else "unknown", and the report is written either way."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))           # no git (nor anything else) on PATH
    monkeypatch.delenv("PMF_COMMIT", raising=False)
    monkeypatch.setattr(report, "COMMIT_FILE", str(tmp_path / "COMMIT"))
    assert report.git_commit() is None
    md = report.main(str(tmp_path / "none.jsonl"), str(tmp_path / "none.log"), str(tmp_path / "out"))
    assert "commit unknown (no git here: set PMF_COMMIT" in md and (tmp_path / "out.json").exists()
    (tmp_path / "COMMIT").write_text("abc1234-dirty\n")
    assert report.commit() == "abc1234-dirty (bench/results/COMMIT)"
    monkeypatch.setenv("PMF_COMMIT", "def5678")
    assert json.loads(open(report.main(None, None, str(tmp_path / "o2")) and str(tmp_path / "o2.json")).read()
                      )["meta"]["commit"] == "def5678"


def test_report_keeps_long_failure_lines_and_the_selftest(tmp_path):
    long = "FAILED tests/test_x.py::test_y[case] - AssertionError: " + "o_dot: error 3.1e-02 > 2 x eager " * 6
    log = tmp_path / "check.log"
    log.write_text("=== selftest (limit 120 s)\nok   attention o: err 1e-3 <= bound 2e-3\n"
                   "FAIL attention (4, 12, 276, 64) bfloat16 o_dot: err 9.0e-02 > bound 1.2e-02\n"
                   "selftest: 137 of 138 checks within bound in 41.0 s; FAILED: attention (4, 12, 276, 64) "
                   "bfloat16 o_dot\n=== exit 1 after 44 s\n"
                   f"=== GPU tests: tests/test_x.py (limit 30 s)\n{long}\n1 failed in 3.00s\n=== exit 1 after 4 s\n")
    md = report.main(None, str(log), str(tmp_path / "out"))
    assert "| selftest | 120 | selftest: 137 of 138 checks within bound" in md
    assert "- `FAIL attention (4, 12, 276, 64) bfloat16 o_dot: err 9.0e-02 > bound 1.2e-02`" in md
    assert f"- `{long}`" in md and "Failures (2):" in md


def _copy_without_git(dst):
    """The tree as the GPU machine gets it: the files, no .git."""
    import shutil
    for name in ("bench", "kernels", "pmf_fast", "tests", "train.py", "sample.py", "pytest.ini", "setup.py"):
        src = os.path.join(ROOT, name)
        copy = shutil.copytree if os.path.isdir(src) else shutil.copy
        copy(src, os.path.join(dst, name), **({"ignore": shutil.ignore_patterns("__pycache__", "results")}
                                               if os.path.isdir(src) else {}))


def _path_without(tmp_path, *names):
    """A PATH with every command of this one except `names`, and python3 as this interpreter."""
    import sys
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for f in os.listdir(d):
            target = os.path.join(d, f)
            if f not in names and not (bin_dir / f).exists() and os.access(target, os.X_OK):
                (bin_dir / f).symlink_to(target)
    (bin_dir / "python3").unlink(missing_ok=True)
    (bin_dir / "python3").symlink_to(sys.executable)
    return str(bin_dir)


@pytest.mark.slow
def test_check_runs_without_git_and_with_python3_only(tmp_path):
    """The dry check in a copy of the tree with no .git, no git and no `python` on PATH (python3
    only, as on the GPU machine): it ends complete, the self-test first, and writes its report."""
    tree = tmp_path / "tree"
    tree.mkdir()
    _copy_without_git(tree)
    path = _path_without(tmp_path, "git", "python")
    env = dict(os.environ, PATH=path, PMF_GPU_CHECK_DRY="1", PMF_RESULTS_DIR=str(tmp_path / "results"),
               PMF_GPU_CHECK_SECONDS="40", PYTHONPATH=str(tree))
    env.pop("OUT", None)
    env.pop("PMF_COMMIT", None)
    proc = subprocess.run(["bash", str(tree / "bench" / "gpu_check.sh"), "--quick"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    md = next((tmp_path / "results").glob("*.md")).read_text()
    assert "Status: complete" in md and "commit unknown (no git here" in md, md
    stages = md.split("## Stages")[1].splitlines()
    first = next(l for l in stages if l.startswith("| ") and not l.startswith("| stage |"))
    assert first.startswith("| selftest | ") and "checks within bound" in first, md
    assert "No failures reported." in md
    saved = json.loads(next((tmp_path / "results").glob("*.selftest.json")).read_text())
    assert saved["ok"] and saved["checks"]

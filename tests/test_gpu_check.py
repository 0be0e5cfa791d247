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

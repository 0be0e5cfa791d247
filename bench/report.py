"""Turn a benchmark JSON-lines file (PMF_BENCH_OUT) and the GPU test log into
bench/results/<date>_<card>.md and .json: card, versions, commit, date, each number with its baseline."""
import datetime
import json
import platform
import subprocess
import sys

import torch


def main(rows_path, tests_summary, out_prefix):
    rows = [json.loads(line) for line in open(rows_path)] if rows_path else []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    meta = {"date": datetime.date.today().isoformat(), "commit": commit,
            "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version(), "gpu_tests": tests_summary}
    with open(out_prefix + ".json", "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    lines = [f"# GPU check: {meta['card']}, {meta['date']}", "",
             f"commit {commit}; torch {meta['torch']}, triton {triton_version}, CUDA {meta['cuda']}", "",
             f"GPU tests: {tests_summary}", "",
             "| group | case | value | unit | TFLOP/s | baseline | baseline value | baseline TFLOP/s | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['group']} | {r['name']} | {r['ms']} | {r.get('unit', 'ms')} | {r.get('tflops', '')} | "
                     f"{r.get('baseline', '')} | "
                     f"{r.get('baseline_ms', '')} | {r.get('baseline_tflops', '')} | {r.get('speedup', '')} |")
    with open(out_prefix + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])

"""Turn the GPU check's benchmark rows (PMF_BENCH_OUT, one JSON line per measurement) and its log
into <prefix>.md and <prefix>.json: card, versions, commit, date, how the check ended, each number
with its p20/p80 and its baseline, how each stage (benchmarks, GPU test files) ended, and every
failure by name and message.

    python bench/report.py ROWS.jsonl CHECK.log PREFIX [--status TEXT] [--seconds N]
    python bench/report.py --stamp     # where git is: write bench/results/COMMIT before the tree is copied

The commit: $PMF_COMMIT, else bench/results/COMMIT (written by --stamp), else `git rev-parse` where
git and .git exist, else "unknown". The GPU machine has no git and its copy of the tree no .git, so
the report never needs either.

Either input may be missing or cut off mid-line (a check killed partway): the report keeps
whatever was written. bench/gpu_check.sh runs this after every stage and from its exit trap.
The log holds one section per stage (one pytest run), as gpu_check.sh writes it:
    === GPU tests: tests/test_x.py (limit 30 s)
    ... pytest -q -rfE output ...
    === exit 0 after 12 s
"""
import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT_FILE = os.path.join(ROOT, "bench", "results", "COMMIT")

# (header, key) of the benchmark table; header and separator are both built from this one list
COLUMNS = [("group", "group"), ("case", "name"), ("median", "ms"), ("p20", "p20_ms"), ("p80", "p80_ms"),
           ("unit", "unit"), ("TFLOP/s", "tflops"), ("baseline", "baseline"), ("baseline median", "baseline_ms"),
           ("baseline p20", "baseline_p20_ms"), ("baseline p80", "baseline_p80_ms"),
           ("baseline TFLOP/s", "baseline_tflops"), ("speed-up", "speedup")]
NOT_DETAILS = {key for _, key in COLUMNS} | {"device"}


def read_rows(path):
    rows = []
    if path and os.path.exists(path):
        for line in open(path):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:        # the last line of a killed run may be cut off
                pass
    return rows


def read_stages(path):
    """[{stage, limit, exit, seconds, result, failures}] from the check's log."""
    if not path or not os.path.exists(path):
        return []
    runs = []
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        start = re.match(r"=== (.+) \(limit (\d+) s\)$", line)
        end = re.search(r"=== exit (\d+) after (\d+) s$", line)      # also after a cut-off line
        if start:
            runs.append({"stage": start.group(1), "limit": int(start.group(2)), "lines": [], "exit": None})
        elif end and runs:
            runs[-1]["exit"], runs[-1]["seconds"] = int(end.group(1)), int(end.group(2))
            runs[-1]["lines"].append(line[:end.start()])
        elif runs:
            runs[-1]["lines"].append(line)
    for r in runs:
        lines = r.pop("lines")
        summary = next((l.strip("= ") for l in reversed(lines)
                        if re.search(r"\d+ (passed|failed|error|skipped|deselected)|checks within bound", l)), "")
        r["failures"] = [l for l in lines if l.startswith(("FAILED ", "ERROR ", "FAIL "))]   # FAIL: selftest
        code = r["exit"]
        if r["limit"] == 0:
            r["result"] = "skipped: the time budget was spent"
        elif code is None:
            r["result"] = "cut short: the check was stopped during this stage"
        elif code in (124, 137):
            r["result"] = (f"timed out after {r['seconds']} s (limit {r['limit']} s)"
                           + (f"; {summary}" if summary else ""))
        elif code == 5:
            r["result"] = "nothing selected (no such case)"
        else:
            r["result"] = (summary or "no summary line") + ("" if code in (0, 1) else f" (exit {code})")
    return runs


def cell(v):
    if v is None:
        return ""
    return str(v).replace("|", "\\|").replace("\n", " ")


def details(row):
    return ", ".join(f"{k}={v}" for k, v in row.items() if k not in NOT_DETAILS and v is not None)


def git_commit():
    """The short commit of this tree, "-dirty" when it has uncommitted changes, or None without git."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30)
        head = run("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):     # no git on PATH
        return None


def commit():
    if os.environ.get("PMF_COMMIT"):
        return os.environ["PMF_COMMIT"]
    try:
        with open(COMMIT_FILE) as f:
            return f.read().strip() + " (bench/results/COMMIT)"
    except OSError:
        pass
    return git_commit() or "unknown (no git here: set PMF_COMMIT or run bench/report.py --stamp before copying)"


def stamp():
    """Write bench/results/COMMIT from git, for a copy of the tree that will have no git."""
    c = git_commit()
    if c is None:
        raise SystemExit("report.py --stamp: no git repository here; set PMF_COMMIT where the check runs instead")
    os.makedirs(os.path.dirname(COMMIT_FILE), exist_ok=True)
    write_atomic(COMMIT_FILE, c + "\n")
    return c


def meta(status, seconds):
    try:
        import torch
        card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        torch_version, cuda = torch.__version__, torch.version.cuda
    except ImportError:
        card, torch_version, cuda = "unknown", "none", None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"date": datetime.date.today().isoformat(), "commit": commit(), "card": card, "torch": torch_version,
            "triton": triton_version, "cuda": cuda, "python": platform.python_version(),
            "status": status, "seconds": seconds}


def render(m, rows, stages):
    lines = [f"# GPU check: {m['card']}, {m['date']}", "",
             f"commit {m['commit']}; torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, "
             f"Python {m['python']}", "",
             f"Status: {m['status']}" + (f" after {m['seconds']} s" if m["seconds"] is not None else ""), "",
             "## Benchmarks", "",
             "Timings in ms unless the unit says otherwise: median with p20/p80 of the repetitions; "
             "speed-up = baseline median / median, measured in the same run.", ""]
    if rows:
        lines.append("| " + " | ".join(h for h, _ in COLUMNS) + " | details |")
        lines.append("|" + "---|" * (len(COLUMNS) + 1))
        for r in rows:
            lines.append("| " + " | ".join(cell(r.get(k)) for _, k in COLUMNS) + f" | {cell(details(r))} |")
    else:
        lines.append("No benchmark row was written.")
    lines += ["", "## Stages (benchmarks and GPU test files, in the order run)", ""]
    if stages:
        lines += ["| stage | limit (s) | result |", "|---|---|---|"]
        lines += [f"| {s['stage']} | {s['limit']} | {cell(s['result'])} |" for s in stages]
        failures = [f for s in stages for f in s["failures"]]
        lines += ["", f"Failures ({len(failures)}):" if failures else "No failures reported."]
        lines += [f"- `{f}`" for f in failures]
    else:
        lines.append("No stage ran.")
    return "\n".join(lines) + "\n"


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(rows_path, log_path, prefix, status="complete", seconds=None):
    m, rows, stages = meta(status, seconds), read_rows(rows_path), read_stages(log_path)
    write_atomic(prefix + ".json", json.dumps({"meta": m, "results": rows, "stages": stages}, indent=2) + "\n")
    md = render(m, rows, stages)
    write_atomic(prefix + ".md", md)
    return md


if __name__ == "__main__":
    if sys.argv[1:] == ["--stamp"]:
        print(f"{COMMIT_FILE}: {stamp()}")
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows")
    ap.add_argument("log")
    ap.add_argument("prefix")
    ap.add_argument("--status", default="complete")
    ap.add_argument("--seconds", type=int)
    a = ap.parse_args()
    print(main(a.rows, a.log, a.prefix, a.status, a.seconds), end="")

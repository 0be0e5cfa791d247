import ast
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pmf_fast.meanflow import to_uint8
from pmf_fast.sampling import GRID_GAP, row_labels, save_grid

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the PNG grid
def digit_like(classes, per, size=16, channels=1):
    """Fresh random images in [-1, 1] and their labels, `per` consecutive images per class."""
    x = torch.rand(classes * per, channels, size, size) * 2 - 1
    y = torch.arange(classes).repeat_interleave(per)
    return x, y


def test_grid_upscales_one_class_per_row_with_labels(tmp_path):
    classes, per = 10, 10
    x, y = digit_like(classes, per)
    labels = row_labels(y, per)
    assert labels == [str(c) for c in range(classes)]
    geo = save_grid(x, tmp_path / "g.png", nrow=per, labels=labels)
    s = geo["scale"]
    assert s == 4                                             # 10 x 16 px -> at least 512 px: 4x
    im = np.asarray(Image.open(tmp_path / "g.png"))
    assert im.ndim == 2                                       # grayscale data -> an "L" PNG
    ch, cw = geo["cell"]
    assert (ch, cw) == (64, 64)
    assert im.shape == (classes * 64 + (classes - 1) * GRID_GAP, geo["left"] + per * 64 + (per - 1) * GRID_GAP)
    assert im.shape[1] >= 512 and geo["left"] > 0
    u8 = to_uint8(x).numpy()[..., 0]                          # [N, 16, 16]
    py, px = geo["pitch"]
    for i in range(len(x)):
        r, c = divmod(i, per)
        cell = im[r * py:r * py + ch, geo["left"] + c * px:geo["left"] + c * px + cw]
        # nearest neighbour: every pixel of the cell is its source pixel, repeated s x s
        assert np.array_equal(cell, np.kron(u8[i], np.ones((s, s), dtype=np.uint8))), i
        assert int(y[i]) == r                                 # row r holds class r
    # label text: bright pixels in the (black) label column beside every row
    for r in range(classes):
        band = im[r * py:r * py + ch, :geo["left"]]
        assert (band > 128).sum() > 20, r
    assert (im[:, :geo["left"]] > 128).sum() > 0 and im[:, :geo["left"]].min() == 0


def test_labels_differ_per_row_and_are_checked(tmp_path):
    x, y = digit_like(3, 4)
    geo = save_grid(x, tmp_path / "a.png", nrow=4, labels=["0", "1", "7"])
    im = np.asarray(Image.open(tmp_path / "a.png"))
    py = geo["pitch"][0]
    left = geo["left"]
    # the rendered "1" and "7" differ, and the text does not depend on the images
    bands = [im[r * py:r * py + geo["cell"][0], :left] > 128 for r in range(3)]
    assert not np.array_equal(bands[1], bands[2]) and not np.array_equal(bands[0], bands[1])
    save_grid(-x, tmp_path / "b.png", nrow=4, labels=["0", "1", "7"])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png"))[:, :left], im[:, :left])
    with pytest.raises(ValueError, match="2 labels for 3 rows"):
        save_grid(x, tmp_path / "c.png", nrow=4, labels=["0", "1"])


def test_grid_without_labels_rgb_and_explicit_scale(tmp_path):
    x, _ = digit_like(2, 3, size=8, channels=3)
    geo = save_grid(x, tmp_path / "g.png", nrow=3, scale=5)
    im = np.asarray(Image.open(tmp_path / "g.png"))
    assert geo["left"] == 0 and im.shape == (2 * 40 + GRID_GAP, 3 * 40 + 2 * GRID_GAP, 3)
    u8 = to_uint8(x).numpy()
    cell = im[40 + GRID_GAP:, 40 + GRID_GAP:80 + GRID_GAP]     # row 1, column 1 = image 4
    assert np.array_equal(cell, u8[4].repeat(5, 0).repeat(5, 1))
    # large images are not enlarged: 3 x 256 px is already wider than 512 px
    big = save_grid(torch.zeros(3, 3, 256, 256), tmp_path / "big.png", nrow=3)
    assert big["scale"] == 1 and Image.open(tmp_path / "big.png").size == (3 * 256 + 2 * GRID_GAP, 256)
    # a partial last row leaves grey cells
    save_grid(x[:4], tmp_path / "p.png", nrow=3, scale=1)
    assert Image.open(tmp_path / "p.png").size == (3 * 8 + 2 * GRID_GAP, 2 * 8 + GRID_GAP)


# ----------------------------------------------------------------------------- import graph
def _modules():
    mods = {}
    for p in sorted((ROOT / "pmf_fast").rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def import_graph():
    """module -> the pmf_fast modules it imports, anywhere in the file (function-local imports
    included: they only postpone a cycle, they do not remove it)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for alias in node.names:                  # `from . import dist` names a module
                    sub = f"{mod}.{alias.name}"
                    deps.add(sub if sub in mods else mod)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        state[u] = "done"
        stack.pop()
        return None

    for u in sorted(graph):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def test_import_graph_is_acyclic():
    graph = import_graph()
    assert "pmf_fast.sampling" in graph and "pmf_fast.eval" in graph
    assert "pmf_fast.eval" in graph["pmf_fast.sampling"] and "pmf_fast.judge" in graph["pmf_fast.sampling"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
    # the checker finds the cycle this test guards against (eval -> sampling -> judge -> eval)
    graph["pmf_fast.eval"] = graph["pmf_fast.eval"] | {"pmf_fast.sampling"}
    assert find_cycle(graph) is not None


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each pmf_fast module imported first, with no pmf_fast module loaded before it (one
    interpreter, pmf_fast dropped from sys.modules between modules, to keep torch's import cost once)."""
    names = [n for n in _modules() if not n.endswith("__main__")]
    code = (
        "import sys, importlib, torch\n"
        f"names = {names!r}\n"
        "bad = []\n"
        "for n in names:\n"
        "    for k in [k for k in sys.modules if k == 'pmf_fast' or k.startswith('pmf_fast.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{n}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr

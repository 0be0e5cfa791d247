"""What `pip install` puts in site-packages (setup.py): one top-level name, pmf_fast. kernels/ stays at
the repository's top level but installs as pmf_fast.kernels (`kernels` is also a PyPI package, Hugging
Face's kernel hub); train.py and sample.py are the checkout's entry scripts, not installed modules."""
import os
import shutil
import subprocess
import sys
import zipfile

from tests.helpers import ROOT


def test_the_wheel_installs_only_pmf_fast_and_its_kernels_import(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("pmf_fast", "kernels"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").iterdir()
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"pmf_fast", "pmf_fast-0.1.0.dist-info"}, names
    kernels = sorted(f for f in os.listdir(os.path.join(ROOT, "kernels")) if f.endswith(".py"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("pmf_fast/kernels/")) == kernels

    # installed alone (no checkout on the path): the kernels and the modules using them import
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    code = ("import pmf_fast.kernels.attention as a, pmf_fast.layers, pmf_fast.optimizers; print(a.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "site" / "pmf_fast" / "kernels" / "attention.py")


def test_a_checkout_imports_its_own_kernels(tmp_path):
    """Run from a checkout, pmf_fast.kernels is the kernels/ beside that checkout's pmf_fast/, not the
    folder an editable install of another checkout (or of none) maps it to."""
    for name in ("pmf_fast", "kernels"):
        shutil.copytree(os.path.join(ROOT, name), tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    code = "import pmf_fast, pmf_fast.kernels.attention as a, pmf_fast.layers; print(pmf_fast.__file__, a.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "pmf_fast" / "__init__.py"),
                                  str(tmp_path / "kernels" / "attention.py")]

"""pmf-fast: a PyTorch trainer for Pixel MeanFlow (pMF, arXiv 2601.22158)."""
import importlib.util as _util
import os as _os
import sys as _sys


def _checkout_kernels():
    """kernels/ sits beside pmf_fast/ in the repository and installs as pmf_fast.kernels (setup.py).
    In a checkout (no pmf_fast/kernels/ inside the package), pmf_fast.kernels is the kernels/ beside
    it: this checkout's, not those of whichever checkout `pip install -e` last mapped, and a checkout
    that was never installed runs too. An installed wheel has pmf_fast/kernels/ and skips this."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    beside = _os.path.join(_os.path.dirname(here), "kernels")
    if _os.path.isdir(_os.path.join(here, "kernels")) or not _os.path.isfile(_os.path.join(beside, "_triton.py")):
        return
    spec = _util.spec_from_file_location(f"{__name__}.kernels", _os.path.join(beside, "__init__.py"),
                                         submodule_search_locations=[beside])
    module = _util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_checkout_kernels()

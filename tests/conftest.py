"""Test set-up: hooks and fixtures (the helpers live in tests/helpers.py). Triton runs in its CPU
interpreter when no GPU is present; that must be decided before triton is imported anywhere."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pmf_fast.selftest import interpreter_problem  # noqa: E402


def pytest_configure(config):
    """Every interpreted kernel fails with triton < 3.8 and numpy >= 2.4: one line with the remedy
    instead of dozens of TypeErrors from inside the interpreter."""
    problem = interpreter_problem()
    if problem:
        raise pytest.UsageError(problem)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip without CUDA, with the marker's reason (pytest.ini registers it)."""
    if torch.cuda.is_available():
        return
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=marker.kwargs.get("reason", "needs a CUDA GPU")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def sample_ckpt(tmp_path_factory):
    """A checkpoint of the tiny test preset with the entries of train.py's that sample.py reads
    (config, model, EMAs; written by save_checkpoint, train.py's writer), seeded, with the
    zero-initialised gates and final layers randomised (wake_up) so that every weight shapes the
    samples. Built, not trained: train.main's two steps take ~18 s on 2 CPU cores, and sampling needs
    no trained weights (tests/test_sample_cli.py, tests/test_eval.py). Tests only read it."""
    from pmf_fast.checkpoint import save_checkpoint
    from pmf_fast.config import get_config
    from pmf_fast.ema import EMAs
    from pmf_fast.model import PMFDiT
    from pmf_fast.selftest import wake_up
    cfg = get_config("pMF-XS/4-test")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = wake_up(PMFDiT(cfg.model, t_eps=cfg.objective.t_eps))
    emas = EMAs(model, cfg.train.ema_halflives_kimg, cfg.train.batch_size)
    return save_checkpoint(str(tmp_path_factory.mktemp("sample_ckpt")), 1, {
        "model": model.state_dict(), "emas": emas.state_dict(), "config": cfg.to_dict()})


@pytest.fixture(scope="session")
def one_process_steps():
    """helpers.train_steps on one process over the whole batch: fp64 (the reference) and fp32 (the
    eager error), what every data-parallel run is held to (tests/test_dist.py, tests/test_multinode.py).
    Session-wide: problem() seeds itself, and the tests only read the tensors."""
    from tests.helpers import train_steps
    return train_steps(0, 1, "ddp", torch.float64), train_steps(0, 1, "ddp", torch.float32)

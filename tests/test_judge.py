import numpy as np
from scipy import linalg

from pmf_fast.judge import frechet_distance, spread


def test_frechet_closed_forms():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 6))
    S = A @ A.T + np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # same covariance: only the mean term remains
    assert np.isclose(frechet_distance(mu1, S, mu2, S), ((mu1 - mu2) ** 2).sum())
    # diagonal covariances: sum of (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    assert np.isclose(frechet_distance(mu1, np.diag(a), mu1, np.diag(b)), ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    # general case against scipy's sqrtm written out
    B = rng.normal(size=(6, 6))
    T = B @ B.T + 0.5 * np.eye(6)
    expect = ((mu1 - mu2) ** 2).sum() + np.trace(S + T - 2 * linalg.sqrtm(S @ T).real)
    assert np.isclose(frechet_distance(mu1, S, mu2, T), expect)


def test_spread():
    f = np.array([[0.0, 0], [2, 0], [10, 10], [10, 14]])
    assert np.isclose(spread(f, np.array([0, 0, 1, 1])), (1 + 2) / 2)

"""An independent judge for the embedded digits default: a classifier trained on the real
digits (not on anything the generator made) scores one-step samples by
  - recognised: the fraction classified as the class they were asked for;
  - frechet: the Frechet distance between generated and real training digits in the
    classifier's hidden-feature space, beside the same distance from the held-out real digits
    (the real-vs-real baseline, same sample count and class mix as the generated set);
  - spread: the mean within-class distance to the class centroid in that space, generated
    beside real. Accuracy alone rewards collapsed samples; the distance and the spread do not.
"""
import numpy as np

from .eval import fid


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), computed by torch-fidelity (as FID is)."""
    return fid({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2})


def mean_and_cov(f):
    """(mean [D], covariance [D, D]) of features [N, D]."""
    return f.mean(0), np.cov(f, rowvar=False)


def spread(f, y):
    """Mean over classes of the mean distance of a class's features to their centroid."""
    return float(np.mean([np.linalg.norm(f[y == c] - f[y == c].mean(0), axis=1).mean() for c in np.unique(y)]))


class DigitsJudge:
    def __init__(self, x_train, y_train, x_test, y_test, seed=0):
        from sklearn.neural_network import MLPClassifier
        self.x_train, self.y_train = self._flat(x_train), np.asarray(y_train)
        self.x_test, self.y_test = self._flat(x_test), np.asarray(y_test)
        self.clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=600, random_state=seed)
        self.clf.fit(self.x_train, self.y_train)
        self.test_accuracy = float(self.clf.score(self.x_test, self.y_test))

    @staticmethod
    def _flat(x):
        return np.asarray(x, dtype=np.float64).reshape(len(x), -1)

    def features(self, x):
        h = self._flat(x) @ self.clf.coefs_[0] + self.clf.intercepts_[0]
        return np.maximum(h, 0)

    def score(self, samples, labels):
        """samples: [N, 1, S, S] in [-1, 1] made for `labels`; returns the metrics dict."""
        labels = np.asarray(labels)
        f_gen, f_train, f_test = self.features(samples), self.features(self.x_train), self.features(self.x_test)
        mu_tr, s_tr = mean_and_cov(f_train)
        return {
            "judge_test_accuracy": self.test_accuracy,
            "recognised": float((self.clf.predict(self._flat(samples)) == labels).mean()),
            "frechet": frechet_distance(*mean_and_cov(f_gen), mu_tr, s_tr),
            "frechet_real_baseline": frechet_distance(*mean_and_cov(f_test), mu_tr, s_tr),
            "spread": spread(f_gen, labels),
            "spread_real": spread(f_test, self.y_test),
            "num_samples": int(len(labels)),
        }

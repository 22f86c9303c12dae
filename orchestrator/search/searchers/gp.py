"""A small Gaussian process on the unit box, in numpy: the global model of the asynchronous MADS and of the
noise-aware champion rule.

- ``GP(u, y)``: Matern 5/2 kernel with one length scale per coordinate (ARD), a signal amplitude and a noise
  variance, fitted by maximizing the log marginal likelihood (analytic gradient, L-BFGS-B from a fixed start
  and from the previous fit's hyperparameters). ``y`` is standardized first; ``cap`` limits the values above a
  quantile (a model of where the loss is *good*: an untrained adapter's loss would otherwise dominate it).
  ``theta=`` skips the fit (the hyperparameters of an earlier one: the cheap update after one more result).
- ``predict(u)``: posterior mean and standard deviation in ``y``'s units; ``noise_sd``: the fitted noise.
- ``expected_improvement(mean, sd, best)`` (minimization) and ``feasible_probability(mean, sd)``.
- ``believe(u_pending)``: the same GP with running points added at their predicted mean (the kriging
  believer: the variance shrinks around them, so parallel proposals spread out); hyperparameters kept.

Deterministic: no random numbers (the optimizer starts from fixed points). Costs O(n^3) per fit; n is a study's
trial count (hundreds at most). Tested by ``python -m pytest tests/test_search_models.py``.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.linalg import cho_factor, cho_solve
from scipy.optimize import minimize
from scipy.special import ndtr

SQRT5 = math.sqrt(5.0)
JITTER = 1e-8
# bounds of log(length scale), log(amplitude^2), log(noise variance) on standardized values
LOG_LENGTH = (math.log(0.03), math.log(20.0))
LOG_AMP = (math.log(0.05), math.log(20.0))
LOG_NOISE = (math.log(1e-6), math.log(1.0))
PRIOR_LENGTH = (math.log(0.5), 1.0)    # weak log-normal prior on each length scale: (mean, sd)


def _diff2(u1: np.ndarray, u2: np.ndarray, lengths: np.ndarray, categorical: np.ndarray | None) -> np.ndarray:
    """Squared scaled differences per coordinate; a categorical coordinate differs by 1 or 0 (Hamming)."""
    diff = u1[:, None, :] - u2[None, :, :]
    if categorical is not None and categorical.any():
        diff = np.where(categorical, (np.abs(diff) > 1e-9).astype(float), diff)
    return (diff / lengths) ** 2


def _kernel(u1: np.ndarray, u2: np.ndarray, lengths: np.ndarray, amp2: float,
            categorical: np.ndarray | None = None) -> np.ndarray:
    r = np.sqrt(np.sum(_diff2(u1, u2, lengths, categorical), axis=2))
    return amp2 * (1.0 + SQRT5 * r + 5.0 / 3.0 * r ** 2) * np.exp(-SQRT5 * r)


class GP:
    def __init__(self, u: np.ndarray, y: np.ndarray, *, cap: float | None = None, noise: bool = True,
                 start: np.ndarray | None = None, theta: np.ndarray | None = None,
                 categorical: np.ndarray | None = None):
        self.u = np.atleast_2d(np.asarray(u, float))
        self.categorical = None if categorical is None else np.asarray(categorical, bool)
        y = np.asarray(y, float)
        if cap is not None and len(y) > 4:
            y = np.minimum(y, np.quantile(y, cap))
        self.y_raw = y
        self.shift = float(np.mean(y))
        self.scale = float(np.std(y)) if np.std(y) > 1e-12 else 1.0
        self.z = (y - self.shift) / self.scale
        self.noise = noise
        self.theta = self._fit(start) if theta is None else np.asarray(theta, float)
        self._factor()

    # -- hyperparameters -----------------------------------------------------------------------
    def _unpack(self, theta: np.ndarray) -> tuple[np.ndarray, float, float]:
        d = self.u.shape[1]
        noise2 = math.exp(theta[d + 1]) if self.noise else math.exp(LOG_NOISE[0])
        return np.exp(theta[:d]), math.exp(theta[d]), noise2

    def _neg_lml(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        lengths, amp2, noise2 = self._unpack(theta)
        n, d = self.u.shape
        diff2 = _diff2(self.u, self.u, lengths, self.categorical)              # n x n x d
        r = np.sqrt(np.sum(diff2, axis=2))
        e = np.exp(-SQRT5 * r)
        k = amp2 * (1.0 + SQRT5 * r + 5.0 / 3.0 * r ** 2) * e
        cov = k + (noise2 + JITTER) * np.eye(n)
        try:
            factor = cho_factor(cov, lower=True)
        except np.linalg.LinAlgError:
            return 1e10, np.zeros_like(theta)
        alpha = cho_solve(factor, self.z)
        logdet = 2.0 * np.sum(np.log(np.diag(factor[0])))
        mean_l, sd_l = PRIOR_LENGTH
        value = 0.5 * self.z @ alpha + 0.5 * logdet + 0.5 * np.sum(((theta[:d] - mean_l) / sd_l) ** 2)
        inner = np.outer(alpha, alpha) - cho_solve(factor, np.eye(n))           # dL/dK = -inner / 2
        grad = np.zeros_like(theta)
        common = amp2 * 5.0 / 3.0 * (1.0 + SQRT5 * r) * e                        # dk/dlog(l_j) / (diff_j^2/l_j^2)
        for j in range(d):
            grad[j] = -0.5 * np.sum(inner * common * diff2[:, :, j]) + (theta[j] - mean_l) / sd_l ** 2
        grad[d] = -0.5 * np.sum(inner * k)
        if self.noise:
            grad[d + 1] = -0.5 * np.trace(inner) * noise2
        return float(value), grad

    def _fit(self, start: np.ndarray | None) -> np.ndarray:
        d = self.u.shape[1]
        bounds = [LOG_LENGTH] * d + [LOG_AMP] + ([LOG_NOISE] if self.noise else [])
        starts = [np.array([math.log(0.5)] * d + [0.0] + ([math.log(1e-2)] if self.noise else []))]
        if start is not None and len(start) == len(starts[0]):
            starts.append(np.clip(start, [b[0] for b in bounds], [b[1] for b in bounds]))
        best = None
        for x0 in starts:
            result = minimize(self._neg_lml, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                              options={"maxiter": 60})
            if best is None or result.fun < best.fun:
                best = result
        return best.x

    def _factor(self) -> None:
        lengths, amp2, noise2 = self._unpack(self.theta)
        self.lengths, self.amp2, self.noise2 = lengths, amp2, noise2
        cov = _kernel(self.u, self.u, lengths, amp2, self.categorical) + (noise2 + JITTER) * np.eye(len(self.u))
        self._chol = cho_factor(cov, lower=True)
        self._alpha = cho_solve(self._chol, self.z)

    # -- predictions ---------------------------------------------------------------------------
    @property
    def noise_sd(self) -> float:
        """The fitted noise's standard deviation, in y's units."""
        return math.sqrt(self.noise2) * self.scale

    def predict(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and sd of the (noise-free) function at ``u``, in y's units."""
        u = np.atleast_2d(np.asarray(u, float))
        cross = _kernel(u, self.u, self.lengths, self.amp2, self.categorical)
        mean = cross @ self._alpha
        v = cho_solve(self._chol, cross.T)
        var = np.maximum(self.amp2 - np.sum(cross * v.T, axis=1), 1e-12)
        return self.shift + self.scale * mean, self.scale * np.sqrt(var)

    def believe(self, u_pending: np.ndarray) -> "GP":
        """This GP with ``u_pending`` observed at their predicted mean (hyperparameters kept)."""
        u_pending = np.atleast_2d(np.asarray(u_pending, float))
        if u_pending.size == 0:
            return self
        mean, _ = self.predict(u_pending)
        other = object.__new__(GP)
        other.__dict__.update(self.__dict__)
        other.u = np.vstack([self.u, u_pending])
        other.z = np.concatenate([self.z, (mean - self.shift) / self.scale])
        other._factor()
        return other


def expected_improvement(mean: np.ndarray, sd: np.ndarray, best: float) -> np.ndarray:
    """E[max(best - f, 0)] for f ~ N(mean, sd^2) (minimization)."""
    sd = np.maximum(sd, 1e-12)
    z = (best - mean) / sd
    return sd * (z * ndtr(z) + np.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi))


def feasible_probability(mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """P(c <= 0) for c ~ N(mean, sd^2)."""
    return ndtr(-mean / np.maximum(sd, 1e-12))

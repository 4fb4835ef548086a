"""Additive statistics of Gaussian models: moments that merge exactly, and Ledoit-Wolf from them.

A Gaussian fitted with Ledoit-Wolf shrinkage needs, per group of samples (a PaDiM feature-grid
location, or one group for all patches), only

    count   n                                   samples in the group
    mean    m = (1/n) sum x                     (G, D)
    scatter S = sum (x - m)(x - m)^T            (G, D, D)  -> empirical covariance S / n
    cubic   T = sum |x - m|^2 (x - m)           (G, D)     (needed to merge quartics)
    quartic Q = sum |x - m|^4                   (G,)       = sum_ij <x_i^2, x_j^2>, the "beta"
                                                           sum of sklearn's ledoit_wolf_shrinkage

Moments of disjoint sample sets merge exactly (Chan-Golub-LeVeque for the scatter, Pebay 2008
for the higher terms): each part's centred sums are shifted to the merged mean
m = (n_a m_a + n_b m_b) / n with d = m_part - m,

    S' = S + n d d^T
    T' = T + tr(S) d + 2 S d + n |d|^2 d
    Q' = Q + 4 d^T T + 4 d^T S d + 2 |d|^2 tr(S) + n |d|^4

and added. Sums stay centred (no raw fourth powers that cancel), so shard statistics merged in
any order give the single-pass statistics to float64 round-off. `ledoit_wolf` then computes
scikit-learn's Ledoit-Wolf estimate (`sklearn.covariance.ledoit_wolf`, assume_centered=True on
the centred samples) from (n, S, Q) alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

_GROUPS_PER_BLOCK = 64
"""Groups (locations) whose centred samples are held at once by `GaussianMoments.of`."""


@dataclass(frozen=True)
class GaussianMoments:
    """Centred moments of ``count`` samples in each of G groups (float64; see the module docstring).

    Attributes:
        count: samples per group (the same for every group).
        mean: (G, D) group means.
        scatter: (G, D, D) sums of centred outer products.
        cubic: (G, D) sums of |x - m|^2 (x - m).
        quartic: (G,) sums of |x - m|^4.
    """

    count: int
    mean: np.ndarray
    scatter: np.ndarray
    cubic: np.ndarray
    quartic: np.ndarray

    @property
    def groups(self) -> int:
        return int(self.mean.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mean.shape[1])

    @classmethod
    def empty(cls, groups: int, dim: int) -> "GaussianMoments":
        """Moments of no samples (the identity of `merge`)."""
        return cls(0, np.zeros((groups, dim)), np.zeros((groups, dim, dim)), np.zeros((groups, dim)), np.zeros(groups))

    @classmethod
    def of(cls, samples: np.ndarray) -> "GaussianMoments":
        """Moments of samples (n, G, D): sample k of group g is samples[k, g] (computed in float64)."""
        samples = np.asarray(samples, dtype=np.float64)
        count, groups, dim = samples.shape
        if count == 0:
            return cls.empty(groups, dim)
        mean = samples.mean(axis=0)  # (G, D)
        scatter = np.empty((groups, dim, dim))
        cubic = np.empty((groups, dim))
        quartic = np.empty(groups)
        for start in range(0, groups, _GROUPS_PER_BLOCK):
            block = slice(start, start + _GROUPS_PER_BLOCK)
            centred = np.ascontiguousarray((samples[:, block] - mean[None, block]).transpose(1, 0, 2))  # (g, n, D)
            scatter[block] = np.matmul(centred.transpose(0, 2, 1), centred)
            squared_norm = np.einsum("gnd,gnd->gn", centred, centred)  # (g, n)
            cubic[block] = np.einsum("gn,gnd->gd", squared_norm, centred)
            quartic[block] = (squared_norm * squared_norm).sum(axis=1)
        return cls(int(count), mean, scatter, cubic, quartic)

    def shifted(self, mean: np.ndarray) -> "GaussianMoments":
        """The same samples' sums centred at ``mean`` (G, D) instead of their own mean."""
        offset = self.mean - mean  # d (G, D)
        n = float(self.count)
        trace = np.trace(self.scatter, axis1=1, axis2=2)  # (G,)
        scatter_offset = np.einsum("gij,gj->gi", self.scatter, offset)  # S d
        norm2 = np.einsum("gd,gd->g", offset, offset)  # |d|^2
        scatter = self.scatter + n * offset[:, :, None] * offset[:, None, :]
        cubic = self.cubic + trace[:, None] * offset + 2.0 * scatter_offset + n * norm2[:, None] * offset
        quartic = (
            self.quartic + 4.0 * np.einsum("gd,gd->g", self.cubic, offset) + 4.0 * np.einsum("gd,gd->g", offset, scatter_offset)
            + 2.0 * norm2 * trace + n * norm2 * norm2
        )
        return GaussianMoments(self.count, np.array(mean, dtype=np.float64), scatter, cubic, quartic)

    def merge(self, other: "GaussianMoments") -> "GaussianMoments":
        """Moments of the union of both sample sets (same groups and dimension)."""
        if (self.groups, self.dim) != (other.groups, other.dim):
            raise ValueError(f"cannot merge moments of shape {(self.groups, self.dim)} and {(other.groups, other.dim)}")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        mean = self.mean + (other.mean - self.mean) * (other.count / count)
        a, b = self.shifted(mean), other.shifted(mean)
        return GaussianMoments(count, mean, a.scatter + b.scatter, a.cubic + b.cubic, a.quartic + b.quartic)

    @staticmethod
    def merge_all(parts: Iterable["GaussianMoments"]) -> "GaussianMoments":
        """Merge several parts (in the order given)."""
        merged: GaussianMoments | None = None
        for part in parts:
            merged = part if merged is None else merged.merge(part)
        if merged is None:
            raise ValueError("merge_all needs at least one part")
        return merged

    def pooled(self) -> "GaussianMoments":
        """One group of every group's samples each centred at its own group mean (the "tied"
        covariance): count * G samples, summed scatters and quartics; mean 0 (centred data)."""
        return GaussianMoments(
            self.count * self.groups, np.zeros((1, self.dim)), self.scatter.sum(axis=0, keepdims=True),
            self.cubic.sum(axis=0, keepdims=True), self.quartic.sum(keepdims=True),
        )

    def covariance(self) -> np.ndarray:
        """(G, D, D) unbiased sample covariances S / (n - 1) (PCA)."""
        return self.scatter / max(1, self.count - 1)

    def ledoit_wolf(self) -> np.ndarray:
        """(G, D, D) Ledoit-Wolf shrinkage covariance of each group's centred samples."""
        return ledoit_wolf(self.count, self.scatter, self.quartic)


def ledoit_wolf(count: int, scatter: np.ndarray, quartic: np.ndarray) -> np.ndarray:
    """scikit-learn's Ledoit-Wolf estimate from moments (vectorized over groups).

    Args:
        count: n, centred samples per group.
        scatter: (G, D, D) sum of their outer products, X^T X.
        quartic: (G,) sum of their fourth norms, sum_k |x_k|^4.

    Returns:
        (G, D, D) float64 (1 - s) C + s mu I with C = X^T X / n, mu = tr(C) / D and the shrinkage
        s of `sklearn.covariance.ledoit_wolf_shrinkage` (one feature: C itself).
    """
    n = float(count)
    dim = scatter.shape[-1]
    emp_cov = scatter / n
    if dim == 1:
        return emp_cov.copy()
    trace = np.trace(emp_cov, axis1=1, axis2=2)  # sum of emp_cov_trace
    mu = trace / dim
    delta_ = (emp_cov * emp_cov).sum(axis=(1, 2))  # sum of squared coefficients of X^T X, / n^2
    beta = (quartic / n - delta_) / (dim * n)
    delta = (delta_ - 2.0 * mu * trace + dim * mu**2) / dim
    beta = np.minimum(beta, delta)
    shrinkage = np.where(beta == 0, 0.0, beta / np.where(delta == 0, 1.0, delta))
    shrunk = (1.0 - shrinkage)[:, None, None] * emp_cov
    diagonal = np.arange(dim)
    shrunk[:, diagonal, diagonal] += (shrinkage * mu)[:, None]
    return shrunk

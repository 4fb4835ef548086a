"""Shared maths: coreset selection, nearest neighbours, Gaussians, reductions, post-processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from defectlens import postprocess
from defectlens.errors import ConfigError
from defectlens.ops.coreset import _farthest_point_traversal, coreset_size, greedy_coreset, naive_greedy_coreset
from defectlens.ops.gaussian import mahalanobis, precision_from_covariance, shrunk_covariance
from defectlens.ops.knn import NearestNeighbours
from defectlens.ops.reduction import fit_reduction


def clustered_points(count: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((count, 6)).astype(np.float32)
    return (latent @ rng.standard_normal((6, dim)).astype(np.float32)
            + 0.1 * rng.standard_normal((count, dim)).astype(np.float32))


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_blocked_greedy_coreset_equals_the_textbook_loop(block):
    points = clustered_points(3000, 24)
    expected = naive_greedy_coreset(points, 300, first=5)
    np.testing.assert_array_equal(_farthest_point_traversal(points, 300, 5, block=block), expected)


def test_greedy_coreset_is_seeded_and_covers_better_than_random():
    points = clustered_points(2000, 32, seed=1)
    first = greedy_coreset(points, 100, projection_dim=16, seed=3)
    assert len(set(first.tolist())) == 100
    np.testing.assert_array_equal(first, greedy_coreset(points, 100, projection_dim=16, seed=3))

    def coverage_radius(indices: np.ndarray) -> float:
        return float(torch.cdist(torch.from_numpy(points), torch.from_numpy(points[indices])).min(1).values.max())

    random_subset = np.random.default_rng(0).choice(2000, 100, replace=False)
    unprojected = greedy_coreset(points, 100, projection_dim=None, seed=3)
    assert coverage_radius(unprojected) < 0.7 * coverage_radius(random_subset)
    assert coverage_radius(first) < coverage_radius(random_subset)


def test_coreset_size_validation():
    assert coreset_size(1000, 0.1) == 100
    assert coreset_size(5, 0.01) == 1
    with pytest.raises(ConfigError):
        coreset_size(10, 0.0)
    with pytest.raises(ConfigError):
        greedy_coreset(np.zeros((3, 2), np.float32), 4)


@pytest.mark.parametrize("k", [1, 3])
def test_nearest_neighbours_match_brute_force_in_any_chunking(k):
    rng = np.random.default_rng(0)
    bank = torch.from_numpy(rng.standard_normal((500, 16)).astype(np.float32))
    queries = torch.from_numpy(rng.standard_normal((300, 16)).astype(np.float32))
    expected = torch.cdist(queries.double(), bank.double()).topk(k, largest=False)
    for chunk_size in (1, 500 * 7, 10**9):
        distances, indices = NearestNeighbours(bank, chunk_size).query(queries, k)
        np.testing.assert_allclose(distances.numpy(), expected.values.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(indices.numpy(), expected.indices.numpy())


def test_nearest_neighbours_can_exclude_rows():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    search = NearestNeighbours(bank)
    distances, indices = search.query(torch.tensor([[0.1, 0.0]]), 1, excluded=torch.tensor([True, False, False]))
    assert indices.item() == 1 and distances.item() == pytest.approx(0.9, abs=1e-5)


def test_mahalanobis_matches_scipy_for_location_and_shared_models():
    rng = np.random.default_rng(0)
    samples = rng.standard_normal((200, 5))
    covariance = shrunk_covariance(samples - samples.mean(0))
    precision = precision_from_covariance(covariance)
    np.testing.assert_allclose(precision @ covariance, np.eye(5), atol=1e-9)
    mean = samples.mean(0)
    query = rng.standard_normal((3, 2, 5))
    shared = mahalanobis(torch.from_numpy(query).float(), torch.from_numpy(mean[None]).float(),
                         torch.from_numpy(precision[None]).float())
    per_location = mahalanobis(torch.from_numpy(query).float(), torch.from_numpy(np.stack([mean, mean])).float(),
                               torch.from_numpy(np.stack([precision, precision])).float())
    for n in range(3):
        for location in range(2):
            expected = scipy_mahalanobis(query[n, location], mean, precision)
            assert shared[n, location].item() == pytest.approx(expected, rel=1e-4)
            assert per_location[n, location].item() == pytest.approx(expected, rel=1e-4)


def test_ledoit_wolf_shrinks_towards_scaled_identity():
    rng = np.random.default_rng(0)
    few_samples = rng.standard_normal((10, 30))  # n < d: the sample covariance is singular
    covariance = shrunk_covariance(few_samples - few_samples.mean(0))
    assert np.linalg.eigvalsh(covariance).min() > 0


def test_negated_pca_keeps_the_lowest_variance_directions():
    rng = np.random.default_rng(0)
    scales = np.array([10.0, 5.0, 1.0, 0.1], dtype=np.float32)
    features = torch.from_numpy(rng.standard_normal((5000, 4)).astype(np.float32) * scales)
    projection = fit_reduction(features, "negated_pca", 2, seed=0)
    kept = np.abs(projection.numpy())
    assert set(np.argmax(kept, axis=0).tolist()) == {2, 3}


def test_random_reduction_is_a_seeded_channel_subset():
    features = torch.randn(100, 10)
    projection = fit_reduction(features, "random", 4, seed=1)
    assert projection.shape == (10, 4) and projection.sum() == 4 and (projection.sum(0) == 1).all()
    torch.testing.assert_close(projection, fit_reduction(features, "random", 4, seed=1))
    with pytest.raises(ConfigError):
        fit_reduction(features, "magic", 4, seed=1)


def test_gaussian_blur_matches_scipy_inside_the_image():
    rng = np.random.default_rng(0)
    maps = rng.random((1, 80, 90)).astype(np.float32)
    blurred = postprocess.gaussian_blur(torch.from_numpy(maps), 4.0).numpy()[0]
    expected = gaussian_filter(maps[0], 4.0, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(blurred, expected, atol=1e-5)


def test_anomaly_maps_resize_to_each_image_size():
    patch_scores = torch.zeros(1, 8, 8)
    patch_scores[0, 2, 5] = 1.0
    maps = postprocess.anomaly_maps(patch_scores, (64, 64), blur_sigma=0)
    assert maps.shape == (1, 64, 64)
    full = postprocess.to_image_size(maps[0], (100, 140))
    assert full.shape == (100, 140) and full.dtype == np.float32
    row, col = np.unravel_index(np.argmax(full), full.shape)
    assert abs(row - 2.5 / 8 * 100) < 8 and abs(col - 5.5 / 8 * 140) < 10

"""SPADE: image kNN on pooled features, pixel kNN against the most similar training images,
leave-one-out calibration, chunked search, save/load."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from defectlens.detector import Detector
from defectlens.errors import ConfigError
from defectlens.methods.spade import Spade
from tests.conftest import textured_images, with_square_defect


@pytest.fixture(scope="module")
def fitted() -> Detector:
    return Detector(method="spade", image_size=64, batch_size=4).fit(textured_images(8, seed=0))


def test_spade_finds_a_pasted_defect_and_loads_identically(fitted: Detector, tmp_path) -> None:
    good = textured_images(1, seed=5)[0]
    defective, mask = with_square_defect(textured_images(1, seed=9)[0], 20, 30, 12)
    normal, bad = fitted.predict_batch([good, defective])
    assert bad.score > 2 * normal.score
    assert mask[np.unravel_index(np.argmax(bad.anomaly_map), bad.anomaly_map.shape)]
    assert bad.anomaly_map[mask].mean() > 2 * bad.anomaly_map[~mask].mean()
    assert fitted.fit_info.method["gallery_images"] == 8 and fitted.fit_info.calibration["num_scores"] == 8

    loaded = Detector.load(fitted.save(tmp_path / "spade.dlens"))
    again = loaded.predict_batch([good, defective])
    assert [p.score for p in again] == [normal.score, bad.score]
    np.testing.assert_array_equal(again[1].anomaly_map, bad.anomaly_map)


def test_image_score_is_the_mean_distance_to_the_two_nearest_training_images(fitted: Detector) -> None:
    method = fitted.method
    x = fitted.preparation.to_tensor(textured_images(3, seed=11))
    pooled, pyramid = method.features(x)
    distances = torch.cdist(pooled.double(), method.global_features.double())
    expected = distances.topk(2, largest=False).values.mean(dim=1)
    patch_scores = method.patch_scores(x)
    torch.testing.assert_close(method.image_scores(x, patch_scores).double(), expected, rtol=1e-4, atol=1e-4)
    # pixels: nearest pixel feature among ALL pixels of the single most similar training image (M = 1)
    nearest = distances.argmin(dim=1)
    for row in range(3):
        gallery = method.pixel_features[nearest[row]].flatten(1).T.double()
        queries = pyramid[row].flatten(1).T.double()
        pixel = torch.cdist(queries, gallery).min(dim=1).values.view(pyramid.shape[-2:])
        torch.testing.assert_close(patch_scores[row].double(), pixel, rtol=1e-4, atol=1e-4)


def test_leave_one_out_compares_a_training_image_only_with_the_others(fitted: Detector) -> None:
    method = fitted.method
    x = fitted.preparation.to_tensor(textured_images(8, seed=0)[:2])
    own = method.patch_scores(x)
    assert float(own.max()) < 0.1  # its own pixels are in the gallery
    own_image_scores = method.image_scores(x, own)  # k = 2: itself (0) and its nearest other image
    held_out = method.held_out_patch_scores(x, torch.tensor([0, 1]))
    assert float(held_out.min()) > 1.0
    scores = method.image_scores(x, held_out)
    others = torch.cdist(method.features(x)[0], method.global_features)
    others[0, 0] = others[1, 1] = float("inf")
    torch.testing.assert_close(scores, others.topk(2, largest=False).values.mean(dim=1), rtol=1e-4, atol=1e-4)
    assert torch.all(scores > own_image_scores)


def same_gallery(fitted: Detector, **options) -> Spade:
    """A SPADE with other options on the gallery of ``fitted`` (no new fit)."""
    method = Spade(**options)
    method.bind(fitted.method.context)
    source = fitted.method
    method.set_gallery(source.global_features, source.pixel_features, source.gallery_image_index)
    return method


def test_chunked_search_gives_the_same_scores_as_one_chunk(fitted: Detector) -> None:
    """The same neighbours and the same distances; the matrix products of different chunk shapes
    round differently in the last bits (float32), so scores agree to 1e-6 relative."""
    x = fitted.preparation.to_tensor(textured_images(2, seed=7))
    whole, chunked = same_gallery(fitted, search_chunk_distances=2**30), same_gallery(fitted, search_chunk_distances=500)
    maps = [whole.patch_scores(x), chunked.patch_scores(x)]  # 500: a few hundred distances at a time
    scores = [whole.image_scores(x, maps[0]), chunked.image_scores(x, maps[1])]
    torch.testing.assert_close(maps[1], maps[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-6, atol=1e-6)


def test_one_training_image_and_tiny_data(caplog) -> None:
    images = textured_images(2, seed=3)
    with caplog.at_level(logging.WARNING):
        single = Detector(method="spade", image_size=64).fit(images[:1])
    assert "too few training images" in caplog.text
    prediction = single.predict(textured_images(1, seed=4)[0])
    assert np.isfinite(prediction.score) and prediction.score > 0
    pair = Detector(method="spade", image_size=64).fit(images)  # leave-one-out against the other image
    assert pair.fit_info.calibration["num_scores"] == 2 and pair.threshold > 0
    with pytest.raises(ConfigError):
        Detector(method="spade", image_neighbors=0)


def test_maps_only_above_the_image_threshold(fitted: Detector) -> None:
    method = same_gallery(fitted, pixel_maps="above_threshold")
    good = textured_images(1, seed=5)[0]
    defective, mask = with_square_defect(textured_images(1, seed=9)[0], 20, 30, 12)
    x = fitted.preparation.to_tensor([good, defective])
    maps = method.patch_scores(x)
    scores = method.image_scores(x, maps)
    assert float(scores[1]) > float(method.image_threshold[0]) >= float(scores[0])
    assert not maps[0].any()  # below the threshold: no pixel kNN, a zero map
    assert maps[1].max() > 0

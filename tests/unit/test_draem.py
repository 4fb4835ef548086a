"""DRAEM: its simulated anomalies (exact masks, with and without an anomaly-source folder), its
networks (any input size, periodic in x on request) and the method end to end on small images
(fit, save/load, seeds, a pasted defect, tiling, the CLI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectlens.cli import build_parser
from defectlens.data.anomaly_source import AUGMENTATIONS, AnomalySource, augment_source, draem_anomaly
from defectlens.data.images import save_png
from defectlens.detector import Detector
from defectlens.errors import DatasetError
from defectlens.networks.draem import DiscriminativeSubNetwork, ReconstructiveSubNetwork, make_circular_in_x
from defectlens.training import seeded
from tests.conftest import textured_images, with_square_defect

TINY = dict(reconstructive_width=4, discriminative_width=8, train_crop=None, max_steps=150, learning_rate=3e-3,
            train_batch_size=4)


def _exact(original: np.ndarray, anomalous: np.ndarray, mask: np.ndarray) -> bool:
    return bool(np.array_equal((anomalous != original).any(axis=-1), mask))


def test_simulated_anomalies_change_exactly_the_masked_pixels_with_the_default_source():
    image = textured_images(1, size=(96, 128), seed=0)[0]
    source = AnomalySource()
    masks = []
    for seed in range(12):
        anomalous, mask = draem_anomaly(image, seed, source, anomaly_probability=1.0)
        assert anomalous.shape == image.shape and anomalous.dtype == np.float32 and mask.dtype == bool
        assert _exact(image, anomalous, mask)
        masks.append(mask)
    assert sum(mask.any() for mask in masks) >= 10  # nearly always an anomaly (Perlin masks may be tiny)
    assert len({mask.tobytes() for mask in masks}) == 12  # a new shape every time
    again, mask = draem_anomaly(image, 3, source, anomaly_probability=1.0)
    np.testing.assert_array_equal(mask, masks[3])  # seeded
    normal = [draem_anomaly(image, seed, source, anomaly_probability=0.5) for seed in range(40)]
    untouched = [m for out, m in normal if not m.any() and np.array_equal(out, image)]
    assert 8 <= len(untouched) <= 32  # about half stay normal (the paper's 0.5)


def test_simulated_anomalies_take_their_pixels_from_an_anomaly_source_folder(tmp_path):
    colours = [(250, 20, 20), (20, 250, 20), (20, 20, 250)]
    for k, colour in enumerate(colours):
        (tmp_path / "class_a").mkdir(exist_ok=True)
        save_png(tmp_path / "class_a" / f"{k}.png", np.full((40, 50, 3), colour, dtype=np.uint8))  # found recursively
    source = AnomalySource(tmp_path, augmentations=0)
    assert len(source.paths) == 3
    drawn = source.draw((30, 20), 0)
    assert drawn.shape == (30, 20, 3)
    assert tuple(np.round(drawn[0, 0] * 255).astype(int)) in colours  # a folder image, resized
    image = np.full((64, 64, 3), 0.5, dtype=np.float32)
    for seed in range(6):
        anomalous, mask = draem_anomaly(image, seed, AnomalySource(tmp_path), anomaly_probability=1.0)
        assert _exact(image, anomalous, mask)
        plain, plain_mask = draem_anomaly(image, seed, source, anomaly_probability=1.0)
        if plain_mask.any():  # (1 - beta) * colour + beta * 0.5: the colour's dominant channel rises
            changed = plain[plain_mask]
            assert (changed.max(axis=1) > 0.5).all() and (changed.min(axis=1) < 0.5).all()
    with pytest.raises(DatasetError):
        AnomalySource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError):
        AnomalySource(tmp_path / "empty")


def test_source_augmentation_is_seeded_and_keeps_the_image_convention():
    image = textured_images(1, size=(48, 40), seed=1)[0]
    first, second = augment_source(image, 5), augment_source(image, 5)
    assert np.array_equal(first, second) and first.shape == image.shape and first.dtype == np.float32
    assert 0.0 <= first.min() and first.max() <= 1.0
    assert not np.array_equal(augment_source(image, 6), first)
    pixels = np.round(image * 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    for augmentation in AUGMENTATIONS:  # every one of the ten keeps shape and dtype
        out = augmentation(pixels, rng)
        assert out.shape == pixels.shape and out.dtype == np.uint8, augmentation.__name__


def test_networks_take_any_size_and_wrap_around_in_x_on_request():
    with seeded(0):
        reconstructive, discriminative = ReconstructiveSubNetwork(4).eval(), DiscriminativeSubNetwork(4).eval()
    x = torch.rand(2, 3, 40, 72)
    with torch.no_grad():
        assert reconstructive(x).shape == (2, 3, 40, 72)
        assert discriminative(torch.cat([x, x], 1)).shape == (2, 2, 40, 72)
        band = torch.rand(1, 3, 64, 128)
        shift = 32  # a multiple of the networks' deepest stride
        plain = reconstructive(band)
        assert not torch.allclose(reconstructive(band.roll(shift, -1)), plain.roll(shift, -1), atol=1e-4)
        make_circular_in_x(reconstructive)
        make_circular_in_x(discriminative)
        for network, inputs in ((reconstructive, band), (discriminative, torch.cat([band, band.flip(1)], 1))):
            torch.testing.assert_close(network(inputs.roll(shift, -1)), network(inputs).roll(shift, -1), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def fitted() -> Detector:
    return Detector(method="draem", image_size=64, batch_size=4, blur_sigma=1.0, seed=0, **TINY).fit(textured_images(12, seed=0))


def test_draem_learns_finds_a_pasted_defect_saves_and_loads(fitted, tmp_path):
    summary = fitted.fit_info.method
    assert summary["steps"] == TINY["max_steps"] and "built-in" in summary["anomaly_source"]
    losses = summary["loss_history"]["loss"]
    assert losses[-1] < 0.6 * losses[0]  # it learned
    normal = textured_images(3, seed=7)
    defective, mask = with_square_defect(textured_images(1, seed=9)[0], 20, 30, 12)
    predictions = fitted.predict_batch([*normal, defective])
    assert predictions[-1].score > max(p.score for p in predictions[:-1])
    anomaly_map = predictions[-1].anomaly_map
    assert mask[np.unravel_index(np.argmax(anomaly_map), anomaly_map.shape)]
    assert anomaly_map[mask].mean() > 1.5 * anomaly_map[~mask].mean()

    loaded = Detector.load(fitted.save(tmp_path / "draem.dlens"))
    assert loaded.method.config() == fitted.method.config()
    again = loaded.predict_batch([*normal, defective])
    assert [p.score for p in again] == [p.score for p in predictions]
    np.testing.assert_array_equal(again[-1].anomaly_map, anomaly_map)


def test_the_image_score_is_the_max_of_the_window_averaged_map(fitted):
    x = torch.zeros(1, 3, 64, 64)
    scores = torch.zeros(1, 64, 64)
    scores[0, 10:13, 40:43] = 1.0  # 9 pixels: the 21 x 21 mean is 9 / 441 at best
    assert fitted.method.image_scores(x, scores).item() == pytest.approx(9 / 441)
    scores[0, 0, 0] = 1.0  # zero padding: a corner pixel's window holds 11 x 11 of the map
    assert fitted.method.image_scores(x, scores).item() == pytest.approx(9 / 441)


def test_the_same_seed_gives_the_same_networks_and_scores(tmp_path):
    images = textured_images(6, seed=1)
    options = dict(image_size=64, batch_size=3, seed=4, reconstructive_width=2, discriminative_width=2, max_steps=3,
                   train_crop=32)
    first = Detector(method="draem", **options).fit(images)
    second = Detector(method="draem", **options).fit(images)
    for name, tensor in first.method.state().items():
        assert torch.equal(tensor, second.method.state()[name]), name
    probe = textured_images(2, seed=8)
    assert [p.score for p in first.predict_batch(probe)] == [p.score for p in second.predict_batch(probe)]
    other = Detector(method="draem", **{**options, "seed": 5}).fit(images)
    assert any(not torch.equal(tensor, other.method.state()[name]) for name, tensor in first.method.state().items())


def test_circular_padding_tiling_and_an_anomaly_source_are_served(tmp_path):
    source = tmp_path / "textures"
    for k in range(2):
        save_png(source / f"{k}.png", (np.random.default_rng(k).random((32, 32, 3)) * 255).astype(np.uint8))
    images = textured_images(4, size=(64, 96), seed=2)
    options = dict(batch_size=2, reconstructive_width=2, discriminative_width=2, max_steps=2, train_crop=None)
    band = Detector(method="draem", image_size=(64, 96), circular_padding=True, anomaly_source=str(source), **options).fit(images)
    assert band.fit_info.method["anomaly_source"] == str(source)
    x = torch.zeros(1, 3, 64, 96)
    wrapped = torch.zeros(1, 64, 96)
    wrapped[0, 30:33, [0, 1, 95]] = 1.0  # a blob across the seam: one window holds all of it
    assert band.method.image_scores(x, wrapped).item() == pytest.approx(9 / 441)
    assert all(np.isfinite(p.anomaly_map).all() for p in band.predict_batch(images[:2]))
    tiled = Detector(method="draem", image_size=(64, 96), tile_size=48, tile_overlap=16, **options).fit(images)
    prediction = tiled.predict(images[0])
    assert prediction.anomaly_map.shape == (64, 96) and np.isfinite(prediction.score)
    assert Detector.load(tiled.save(tmp_path / "tiled.dlens")).predict(images[0]).score == prediction.score


def test_the_cli_offers_draems_options(capsys):
    with pytest.raises(SystemExit):
        build_parser(["fit", "--method", "draem"]).parse_args(["fit", "--method", "draem", "--help"])
    text = capsys.readouterr().out
    for flag in ("--anomaly-source", "--reconstructive-width", "--discriminative-width", "--train-crop", "--score-window"):
        assert flag in text

"""Reverse distillation (Deng & Li 2022): the OCBE + decoder shapes, the multi-scale cosine
loss and map, few-shot fits, determinism, model files, circular padding, tiling and the CLI -
on tiny images and budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from defectlens.cli import main
from defectlens.data.images import save_png
from defectlens.detector import Detector
from defectlens.errors import ConfigError, ModelFileError, NonFiniteLossError
from defectlens.methods.base import MethodContext
from defectlens.methods import reverse_distillation as rd
from defectlens.methods.reverse_distillation import ReverseDistillation, default_encoder_layers
from defectlens.networks.reverse_distillation import OneClassBottleneck, StudentDecoder
from defectlens.samples import Batch
from tests.conftest import textured_images, with_square_defect

FAST = dict(image_size=64, batch_size=4, blur_sigma=1.0, train_batch_size=4)


@pytest.fixture(scope="module")
def fitted():
    return Detector(method="reverse_distillation", max_steps=40, **FAST).fit(textured_images(10, seed=0))


def images_tensor(images) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def test_bottleneck_and_decoder_mirror_the_encoder_levels():
    assert default_encoder_layers("efficientnet_lite0") == ["_blocks.2", "_blocks.4", "_blocks.10"]
    channels, strides = [24, 40, 112], [4, 8, 16]
    bottleneck = OneClassBottleneck(channels, strides, width=64)
    decoder = StudentDecoder(channels, width=64, blocks=2)
    features = [torch.randn(2, c, 96 // s, 80 // s) for c, s in zip(channels, strides)]
    embedding = bottleneck(features)
    assert embedding.shape == (2, 64, 3, 3)  # twice the deepest stride: ceil(6 / 2), ceil(5 / 2)
    restored = decoder(embedding, [tuple(f.shape[-2:]) for f in features])
    assert [tuple(r.shape) for r in restored] == [tuple(f.shape) for f in features]
    assert all((r < 0).any() for r in restored)  # linear heads: signed like EfficientNet's features
    wide = StudentDecoder(channels, width=64, blocks=2, width_factor=3)
    assert wide.up[0].block.conv1.out_channels == 3 * 112 and wide.head[0].out_channels == 112
    with pytest.raises(ValueError, match="powers of two"):
        OneClassBottleneck([8, 8], [4, 12], width=8)


def test_loss_is_the_mean_over_levels_of_one_minus_cosine_and_the_map_their_sum(fitted):
    method = fitted.method
    x = images_tensor(textured_images(2, seed=3))
    encoded, restored = method.teacher_and_student(x)
    assert [e.shape[1] for e in encoded] == [24, 40, 112] and len(restored) == 3
    distances = [1 - F.cosine_similarity(e, d, dim=1) for e, d in zip(encoded, restored)]
    batch = Batch(x, torch.arange(2), [None, None], [(64, 64)] * 2)
    expected_loss = sum(d.mean() for d in distances) / 3
    torch.testing.assert_close(method.training_step(batch).detach(), expected_loss.detach())
    grid = distances[0].shape[-2:]
    expected_map = sum(F.interpolate(d[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0] for d in distances)
    torch.testing.assert_close(method.patch_scores(x), expected_map)
    assert method.patch_scores(x).shape == (2, 16, 16)  # the stride-4 grid


def test_a_pasted_defect_scores_higher_and_peaks_inside_it(fitted):
    summary = fitted.fit_info.method
    assert summary["steps"] == 40
    losses = summary["loss_history"]["loss"]
    assert losses[-1] < 0.5 * losses[0]
    defective, mask = with_square_defect(textured_images(1, seed=9)[0], 20, 30, 12)
    good, bad = fitted.predict_batch([textured_images(1, seed=5)[0], defective])
    assert bad.score > good.score
    assert mask[np.unravel_index(np.argmax(bad.anomaly_map), bad.anomaly_map.shape)]


def test_the_papers_optimizer_settings_are_the_defaults():
    method = ReverseDistillation()
    config = method.training_config()
    assert (config.optimizer, config.learning_rate, config.betas) == ("adam", 0.005, (0.5, 0.999))
    assert ReverseDistillation(adam_betas=[0.9, 0.99]).training_config().betas == (0.9, 0.99)
    with pytest.raises(ConfigError):
        ReverseDistillation(decoder_blocks=0)


def test_same_seed_gives_the_same_weights_and_scores():
    images = textured_images(5, seed=2)
    probe = textured_images(2, seed=8)
    runs = [Detector(method="reverse_distillation", max_steps=4, seed=3, **FAST).fit(images) for _ in range(2)]
    first, second = (run.method.state() for run in runs)
    assert first.keys() == second.keys() and not any(name.startswith("encoder.") for name in first)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert [p.score for p in runs[0].predict_batch(probe)] == [p.score for p in runs[1].predict_batch(probe)]
    other = Detector(method="reverse_distillation", max_steps=4, seed=4, **FAST).fit(images).method.state()
    assert not torch.equal(other["decoder.up.0.block.conv1.weight"], first["decoder.up.0.block.conv1.weight"])


def test_save_and_load_give_identical_scores_and_maps(fitted, tmp_path):
    loaded = Detector.load(fitted.save(tmp_path / "rd.dlens"))
    assert loaded.method.config() == fitted.method.config()
    probe = [textured_images(1, seed=5)[0], with_square_defect(textured_images(1, seed=9)[0], 20, 30, 12)[0]]
    before, after = fitted.predict_batch(probe), loaded.predict_batch(probe)
    assert [p.score for p in after] == [p.score for p in before]
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def _tamper_one_weight(path, prefix: str) -> None:
    """Add 1 to one element of the first saved tensor whose name starts with ``prefix``, keep the metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    name = next(key for key in tensors if prefix in key)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1
    save_file(tensors, str(path), metadata=metadata)


def test_a_model_file_with_a_tampered_decoder_weight_is_refused(fitted, tmp_path):
    path = fitted.save(tmp_path / "rd.dlens")
    _tamper_one_weight(path, "decoder.")
    with pytest.raises(ModelFileError, match="checksum"):
        Detector.load(path)


def test_a_nan_loss_stops_training_naming_the_step(monkeypatch):
    calls = {"n": 0}
    original = rd.cosine_distance_maps

    def poisoned(teacher, student):
        calls["n"] += 1
        maps = original(teacher, student)
        return [m * float("nan") for m in maps] if calls["n"] == 2 else maps

    monkeypatch.setattr(rd, "cosine_distance_maps", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 2"):
        Detector(method="reverse_distillation", max_steps=5, **FAST).fit(textured_images(4, seed=1))


def test_a_single_image_is_enough():
    image = textured_images(1, seed=4)[0]
    detector = Detector(method="reverse_distillation", max_steps=5, **FAST).fit([image])
    assert detector.fit_info.method["steps"] == 5
    assert np.isfinite(detector.predict(with_square_defect(image, 10, 10, 8)[0]).score)


def test_circular_padding_makes_the_map_roll_with_the_band():
    cols, rows = np.arange(128)[None, :], np.arange(32)[:, None]

    def band(seed: int) -> np.ndarray:
        values = 0.5 + 0.3 * np.sin(2 * np.pi * 4 * cols / 128) * np.cos(rows / 5.0)
        noise = np.random.default_rng(seed).normal(0, 0.02, (32, 128, 3))
        return np.clip(np.repeat(values[..., None], 3, axis=2) + noise, 0, 1).astype(np.float32)

    detector = Detector(method="reverse_distillation", image_size=(32, 128), circular_padding=True, max_steps=3,
                        batch_size=4, blur_sigma=1.0).fit([band(seed) for seed in range(4)])
    test_band = band(10)
    anomaly_map = detector.predict(test_band).anomaly_map
    back = np.roll(detector.predict(np.roll(test_band, 32, axis=1)).anomaly_map, -32, axis=1)
    np.testing.assert_allclose(back, anomaly_map, rtol=1e-3, atol=1e-4 * np.abs(anomaly_map).max())


def test_tiling_scores_full_resolution_images():
    images = textured_images(4, size=(128, 128), seed=0)
    detector = Detector(method="reverse_distillation", max_steps=60, tile_size=64, tile_overlap=16,
                        **{**FAST, "image_size": 128}).fit(images)
    defective, mask = with_square_defect(textured_images(1, size=(128, 128), seed=5)[0], 80, 24, 16)
    anomaly_map = detector.predict(defective).anomaly_map
    assert anomaly_map.shape == (128, 128)  # stitched from 9 tiles of 64 px
    assert mask[np.unravel_index(np.argmax(anomaly_map), anomaly_map.shape)]
    assert anomaly_map[mask].mean() > np.percentile(anomaly_map[~mask], 99)


def test_cli_fit_with_a_method_option(tmp_path):
    data = tmp_path / "good"
    data.mkdir()
    for k, image in enumerate(textured_images(4, seed=2)):
        save_png(data / f"{k}.png", (image * 255).astype(np.uint8))
    out = tmp_path / "rd.dlens"
    assert main(["fit", "--method", "reverse_distillation", "--data", str(data), "--out", str(out), "--image-size", "64",
                 "--max-steps", "3", "--bottleneck-width", "32", "--adam-betas", "0.9", "0.99", "-q"]) == 0
    loaded = Detector.load(out)
    assert loaded.method.bottleneck_width == 32 and tuple(loaded.method.adam_betas) == (0.9, 0.99)
    assert loaded.method.networks["bottleneck"].embed[0].conv1.out_channels == 32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_it_trains_and_scores_on_cuda():
    images = textured_images(4, seed=0)
    detector = Detector(method="reverse_distillation", device="cuda", max_steps=3, **FAST).fit(images)
    assert next(detector.method.networks["decoder"].parameters()).device.type == "cuda"
    assert np.isfinite(detector.predict(images[0]).score)


def test_bound_method_builds_on_the_contexts_backbone():
    method = ReverseDistillation(encoder_layers=["features.3", "features.6", "features.13"])
    method.bind(MethodContext(backbone="mobilenet_v2", image_size=(64, 64)))
    assert method.networks["encoder"].channels == [24, 32, 96]

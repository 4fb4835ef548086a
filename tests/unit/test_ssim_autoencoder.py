"""The SSIM autoencoder (SCAE): fit, find a pasted defect, save and load, the map and image-score options."""

from __future__ import annotations

import pytest
import torch

from defectlens.detector import Detector
from defectlens.errors import ConfigError
from defectlens.methods.ssim_autoencoder import SsimAutoencoder
from tests.conftest import textured_images
from tests.unit.pet_method_checks import check_fit_find_save_load, check_one_image, pasted_defect


def test_ssim_autoencoder_finds_a_pasted_defect_and_loads_identically(tmp_path) -> None:
    check_fit_find_save_load("ssim_autoencoder", tmp_path, size=128, images=4, max_steps=10, learning_rate=2e-3)


def test_ssim_autoencoder_map_and_image_score_options(tmp_path) -> None:
    detector = Detector(method="ssim_autoencoder", image_size=128, max_steps=3, anomaly_map="ssim", image_score="mean")
    detector.fit(textured_images(3, size=(128, 128)))
    method = detector.method
    defective, _ = pasted_defect(128)
    x = detector.preparation.to_tensor([defective])
    with torch.no_grad():
        reconstruction = method.networks["autoencoder"](x)
    ssim = method.ssim_map(reconstruction, x)
    scores = method.patch_scores(x)
    torch.testing.assert_close(scores, (1 - ssim).mean(dim=1))  # the SSIM map option
    torch.testing.assert_close(method.image_scores(x, scores), scores.flatten(1).mean(dim=1))  # "mean"
    assert SsimAutoencoder().image_scores(x, scores) is None  # "max": the max of the post-processed map
    with pytest.raises(ConfigError):
        Detector(method="ssim_autoencoder", anomaly_map="nope")
    with pytest.raises(ConfigError, match="128, 256"):
        Detector(method="ssim_autoencoder", image_size=100).fit(textured_images(2, size=(100, 100)))


def test_ssim_autoencoder_trains_on_one_image() -> None:
    check_one_image("ssim_autoencoder", size=128, max_steps=3)

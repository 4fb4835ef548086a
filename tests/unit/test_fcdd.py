"""FCDD (1x1 convolution on pretrained features, HSC with blackened-confetti outlier exposure,
receptive-field Gaussian upsampling) and FCDD+FPN (the same objective through the FPN decoder)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from defectlens.detector import Detector
from defectlens.errors import ConfigError
from defectlens.ops.hsc import hsc_pixel_loss
from tests.conftest import textured_images
from tests.unit.pet_method_checks import check_fit_find_save_load, check_one_image

BLACK = (0.0, 0.0, 0.0)  # what the outlier exposure teaches them: dark inclusions


def hsc_before_and_after(detector: Detector) -> tuple[float, float]:
    """HSC loss with the outliers' masks (the default objective) of one fixed outlier-exposed batch
    under the initial and under the trained weights."""
    trained = detector.method
    initial = trained.unfitted_copy()  # networks built under the same seed: the initial weights
    images = detector.preparation.to_tensor(textured_images(8, seed=21))
    torch.manual_seed(5)
    exposed = trained.outliers(images)
    maps = [method.patch_scores(exposed.images) for method in (initial, trained)]
    return tuple(float(hsc_pixel_loss(m, exposed.masks)) for m in maps)  # type: ignore[return-value]


def test_fcdd_finds_a_dark_defect_and_loads_identically(tmp_path) -> None:
    detector = check_fit_find_save_load("fcdd", tmp_path, color=BLACK, loss_falls=False, max_steps=30)
    before, after = hsc_before_and_after(detector)
    assert after < before
    method = detector.method
    assert method.optimizer == "adam" and method.objective == "pixel" and method.max_anomalies == 2
    assert method.networks["upsample"].sigma == 8.0 and method.networks["upsample"].kernel_size == 68
    names = sorted(name.split(".")[0] for name in method.state())
    assert names == ["head", "head", "standardize", "standardize", "upsample"]  # encoder frozen: not saved
    standardize = method.networks["standardize"]  # fitted to the training features, not the identity
    assert float(standardize.mean.abs().max()) > 0 and not torch.allclose(standardize.std, torch.ones_like(standardize.std))
    features = standardize(method.networks["encoder"](detector.preparation.to_tensor(textured_images(4, seed=0)))[0])
    assert abs(float(features.mean())) < 0.5 and 0.5 < float(features.std()) < 1.5
    x = torch.rand(2, 3, 64, 64)
    assert method.patch_scores(x).shape == (2, 64, 64)  # upsampled to input resolution by the method


@pytest.mark.parametrize("method", ["fcdd", "fcdd_fpn"])
def test_training_batches_get_blackened_confetti_outliers(method: str) -> None:
    """What the training step sees: about half the images with 1-2 black shapes, labelled 1."""
    detector = Detector(method=method, image_size=64, max_steps=1)
    seen = []
    original_outliers = detector.method.outliers

    def recording_outliers(x):
        exposed = original_outliers(x)
        seen.append((x, exposed))
        return exposed

    detector.method.outliers = recording_outliers
    detector.fit(textured_images(4, seed=1))
    assert len(seen) == 1  # the one training step drew its outliers here
    images, exposed = seen[0]
    assert torch.equal(exposed.images[exposed.labels == 0], images[exposed.labels == 0])
    torch.manual_seed(0)
    many = detector.method.outliers(images.repeat(16, 1, 1, 1))
    assert 16 <= int(many.labels.sum()) <= 48  # of 64, p = 0.5
    for row in range(many.images.shape[0]):
        changed = (many.images[row] != images[row % images.shape[0]]).any(dim=0).numpy()
        assert np.array_equal(changed, many.masks[row].numpy())
        if many.labels[row]:
            assert 1 <= ndimage.label(changed)[1] <= 2 and (many.images[row][:, changed] == 0).all()
        else:
            assert not changed.any()


def test_fcdd_options_are_checked() -> None:
    with pytest.raises(ConfigError):
        Detector(method="fcdd", outlier_fraction=1.5)
    with pytest.raises(ConfigError):
        Detector(method="fcdd_fpn", max_anomalies=0)
    with pytest.raises(ConfigError, match="objective"):
        Detector(method="fcdd", objective="pixels")


def test_fcdd_methods_train_on_one_image() -> None:
    check_one_image("fcdd", max_steps=3)
    check_one_image("fcdd_fpn", max_steps=3)  # FCDD+FPN's fit test: test_fcdd_fpn.py
    check_one_image("fcdd", max_steps=3, objective="image")  # FCDD's label-only Eq. 2

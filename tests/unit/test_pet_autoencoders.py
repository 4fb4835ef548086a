"""The FPN-L2 autoencoder (pretrained encoder + FPN decoder); the SSIM autoencoder: test_ssim_autoencoder.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from defectlens.detector import Detector
from defectlens.methods.fpn_autoencoder import FpnAutoencoder
from tests.conftest import textured_images
from tests.unit.pet_method_checks import check_fit_find_save_load, check_one_image


def test_fpn_autoencoder_finds_a_pasted_defect_and_loads_identically(tmp_path) -> None:
    detector = check_fit_find_save_load("fpn_autoencoder", tmp_path, max_steps=25)
    assert detector.method.optimizer == "adam"  # the study's sgd_nesterov is an option
    assert not any(name.startswith("encoder.") for name in detector.method.state())  # frozen: not saved


def test_fpn_autoencoder_with_a_trained_encoder_saves_it(tmp_path) -> None:
    detector = Detector(method="fpn_autoencoder", image_size=32, max_steps=1, train_encoder=True)
    before = {k: v.clone() for k, v in detector.method.networks["encoder"].state_dict().items()}
    detector.fit(textured_images(3, size=(32, 32)))
    state = detector.method.state()
    assert any(name.startswith("encoder.") for name in state)
    changed = [k for k, v in detector.method.networks["encoder"].state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    loaded = Detector.load(detector.save(tmp_path / "ae.dlens"))
    image = textured_images(1, size=(32, 32), seed=8)[0]
    assert loaded.predict(image).score == detector.predict(image).score


def test_fpn_autoencoder_is_periodic_in_x_with_circular_padding() -> None:
    bands = [np.tile(image, (1, 4, 1)) for image in textured_images(4, size=(32, 32), seed=1)]  # (32, 128)
    detector = Detector(method="fpn_autoencoder", image_size=(32, 128), circular_padding=True, max_steps=3)
    detector.fit(bands)
    rolled_by = 32  # a multiple of the deepest stride
    x = detector.preparation.to_tensor([bands[0], np.roll(bands[0], rolled_by, axis=1)])
    circular = detector.method
    # the same weights in zero-padded networks: the control, which must show a seam
    plain = FpnAutoencoder(**circular.config())
    plain.bind(dataclasses.replace(circular.context, circular_padding=False))
    plain.load_state(circular.state())
    for method, periodic in ((circular, True), (plain, False)):
        scores = method.patch_scores(x)
        expected = torch.roll(scores[0], rolled_by, dims=-1)
        assert torch.allclose(scores[1], expected, rtol=1e-4, atol=1e-6) == periodic


def test_fpn_autoencoder_trains_on_one_image() -> None:
    check_one_image("fpn_autoencoder", max_steps=3)

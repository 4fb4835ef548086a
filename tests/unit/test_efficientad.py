"""EfficientAD: the paper's networks and losses, map normalization, model files, determinism,
1-image fits, the bundled teacher's SHA-256 check, circular padding, tiling and the CLI - on
tiny images and budgets (the accuracy at the CPU budget is measured by the benchmarks)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from defectlens.cli import build_parser
from defectlens.detector import Detector
from defectlens.errors import ModelFileError, NonFiniteLossError
from defectlens.methods import efficientad as ead
from defectlens.methods.efficientad import EfficientAD, autoencoder_augmentation, hard_feature_loss
from defectlens.networks import bundled as bundled_files, pdn
from defectlens.networks.efficientad_autoencoder import EfficientADAutoencoder
from defectlens.networks.pdn import PDN, load_teacher
from defectlens.samples import FitData
from tests.conftest import textured_images, with_square_defect

FAST = dict(image_size=64, batch_size=4, blur_sigma=1.0, autoencoder_size=64, calibration_split=0.25)


def fit(images, **options) -> Detector:
    return Detector(method="efficientad", **{**FAST, "max_steps": 30, **options}).fit(images)


@pytest.fixture(scope="module")
def fitted() -> Detector:
    return fit(textured_images(8, seed=0), max_steps=40, learning_rate=1e-3)


def tensor(images) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------ networks
def test_the_pdns_are_the_papers_tables():
    def table(net):
        return [(type(m).__name__, getattr(m, "out_channels", None), m.kernel_size, m.padding)
                for m in net.layers if hasattr(m, "kernel_size")]

    assert table(PDN("small")) == [
        ("PeriodicConv2d", 128, (4, 4), (3, 3)), ("PeriodicAvgPool2d", None, 2, 1),
        ("PeriodicConv2d", 256, (4, 4), (3, 3)), ("PeriodicAvgPool2d", None, 2, 1),
        ("PeriodicConv2d", 256, (3, 3), (1, 1)), ("PeriodicConv2d", 384, (4, 4), (0, 0))]
    assert table(PDN("medium", 768))[-4:] == [
        ("PeriodicConv2d", 512, (1, 1), (0, 0)), ("PeriodicConv2d", 512, (3, 3), (1, 1)),
        ("PeriodicConv2d", 768, (4, 4), (0, 0)), ("PeriodicConv2d", 768, (1, 1), (0, 0))]
    # the public reference code's nn.Sequential keys, so its teacher files load unchanged
    assert list(PDN("small").layers.state_dict())[::2] == ["0.weight", "3.weight", "6.weight", "8.weight"]
    with torch.no_grad():
        assert PDN("small")(torch.rand(1, 3, 256, 256)).shape == (1, 384, 64, 64)
        assert PDN("small", 768)(torch.rand(1, 3, 128, 96)).shape == (1, 768, 32, 24)
        out = EfficientADAutoencoder()(torch.rand(2, 3, 128, 128), (32, 32))
    assert out.shape == (2, 384, 32, 32)


def test_a_pdn_cell_sees_33_pixels_centred_on_4i():
    net = PDN("small").eval()
    image = torch.zeros(1, 3, 128, 128, requires_grad=True)
    net(image)[0, :, 10, 12].sum().backward()
    rows, cols = torch.nonzero(image.grad.abs().sum(dim=(0, 1)), as_tuple=True)
    assert (rows.min().item(), rows.max().item()) == (40 - 16, 40 + 16)
    assert (cols.min().item(), cols.max().item()) == (48 - 16, 48 + 16)


def test_hard_feature_loss_is_the_mean_at_or_above_the_quantile():
    distances = torch.rand(2, 384, 16, 16, generator=torch.Generator().manual_seed(0))
    threshold = torch.quantile(distances.flatten(), 0.999)
    expected = distances[distances >= threshold].mean()
    torch.testing.assert_close(hard_feature_loss(distances, 0.999), expected)
    torch.testing.assert_close(hard_feature_loss(distances, 0.0), distances.mean())
    big = torch.rand(2**24 + 10)  # beyond torch.quantile's limit
    assert 0.999 < hard_feature_loss(big, 0.999).item() <= 1.0


def test_autoencoder_augmentation_jitters_brightness_contrast_or_saturation():
    torch.manual_seed(0)
    images = torch.rand(64, 3, 8, 8) * 0.5 + 0.25
    augmented = autoencoder_augmentation(images, 0.2)
    ratio = (augmented / images)
    assert augmented.shape == images.shape and 0 <= augmented.min() and augmented.max() <= 1
    assert not torch.equal(augmented, images)
    # brightness multiplies every pixel of an image by one factor in [0.8, 1.2]
    spread = ratio.flatten(1).std(dim=1)
    uniform = spread < 1e-5
    assert uniform.any() and (~uniform).any()
    assert ratio[uniform].min() >= 0.8 - 1e-5 and ratio[uniform].max() <= 1.2 + 1e-5


# ------------------------------------------------------------------------------------ behaviour
def test_a_pasted_defect_scores_higher_and_peaks_inside_it(fitted):
    summary = fitted.fit_info.method
    assert summary["steps"] == 40 and summary["stop_reason"] == "max_steps"
    losses = summary["loss_history"]["loss"]
    assert losses[-1] < 0.7 * losses[0]
    defective, mask = with_square_defect(textured_images(1, seed=9)[0], 20, 30, 12)
    good, bad = fitted.predict_batch([textured_images(1, seed=5)[0], defective])
    assert bad.score > good.score
    assert mask[np.unravel_index(np.argmax(bad.anomaly_map), bad.anomaly_map.shape)]


def test_the_map_is_the_mean_of_the_two_quantile_normalized_maps(fitted):
    method = fitted.method
    x = tensor(textured_images(2, seed=7))
    with torch.no_grad():
        teacher = (method.networks["teacher"](x) - method.teacher_mean.view(1, -1, 1, 1)) / method.teacher_std.view(1, -1, 1, 1)
        student = method.networks["student"](x)
        reconstruction = method.networks["autoencoder"](x, (16, 16))
    local = (teacher - student[:, :384]).pow(2).mean(1)
    global_ = (reconstruction - student[:, 384:]).pow(2).mean(1)
    qa_st, qb_st, qa_ae, qb_ae = method.map_quantiles.tolist()
    expected = 0.5 * 0.1 * (local - qa_st) / (qb_st - qa_st) + 0.5 * 0.1 * (global_ - qa_ae) / (qb_ae - qa_ae)
    torch.testing.assert_close(method.patch_scores(x), expected)
    assert qa_st < qb_st and qa_ae < qb_ae


def test_quantiles_come_from_the_held_out_images_or_from_all_training_images(fitted):
    images = textured_images(8, seed=0)
    method = fitted.method
    original = method.map_quantiles.clone()
    try:
        check_quantiles(method, FitData(images, fitted.preparation, fitted.encode, 4, fit_indices=range(6),
                                        held_out_indices=[6, 7]), images)
    finally:
        method.map_quantiles, method.map_normalization = original, "held_out"


def check_quantiles(method, data, images) -> None:
    method.after_training(data)  # the paper: quantiles of the maps of the held-out images
    held_local, held_global = method.maps(tensor(images[6:]))
    expected = [np.quantile(m.flatten().double().numpy(), q) for m in (held_local, held_global) for q in (0.9, 0.995)]
    np.testing.assert_allclose(method.map_quantiles.tolist(), expected, rtol=1e-5)
    method.map_normalization = "training"  # the AutoVI study's variant: every training image
    method.after_training(data)
    all_local, all_global = method.maps(tensor(images))
    expected = [np.quantile(m.flatten().double().numpy(), q) for m in (all_local, all_global) for q in (0.9, 0.995)]
    np.testing.assert_allclose(method.map_quantiles.tolist(), expected, rtol=1e-5)


def test_save_and_load_give_identical_scores(fitted, tmp_path):
    loaded = Detector.load(fitted.save(tmp_path / "efficientad.dlens"))
    assert loaded.method.config() == fitted.method.config()
    assert "teacher.layers.0.weight" not in fitted.method.state()  # the frozen teacher is not copied into models
    images = [textured_images(1, seed=5)[0], with_square_defect(textured_images(1, seed=9)[0], 20, 30, 12)[0]]
    for before, after in zip(fitted.predict_batch(images), loaded.predict_batch(images)):
        assert before.score == after.score
        np.testing.assert_array_equal(before.anomaly_map, after.anomaly_map)


def test_same_seed_same_weights_and_scores_other_seed_other_weights():
    images = textured_images(6, seed=1)
    first, second = fit(images, max_steps=8, seed=3), fit(images, max_steps=8, seed=3)
    for name, value in first.method.state().items():
        assert torch.equal(value, second.method.state()[name]), name
    probe = textured_images(1, seed=11)
    assert first.predict(probe[0]).score == second.predict(probe[0]).score
    other = fit(images, max_steps=8, seed=4)
    assert not torch.equal(other.method.state()["student.layers.0.weight"], first.method.state()["student.layers.0.weight"])


def test_one_training_image_is_enough(caplog):
    with caplog.at_level(logging.WARNING):
        detector = fit(textured_images(1, seed=2), max_steps=6)
    assert "normalized on the training images" in caplog.text
    assert "own scores" in caplog.text  # the detector's threshold from the image itself
    prediction = detector.predict(textured_images(1, seed=3)[0])
    assert np.isfinite(prediction.score) and np.isfinite(prediction.anomaly_map).all()


def test_a_nan_loss_stops_training_naming_the_step(monkeypatch):
    calls = {"n": 0}
    real = EfficientAD._teacher

    def poisoned(self, images):
        calls["n"] += 1
        output = real(self, images)
        return output * float("nan") if calls["n"] > 3 else output

    monkeypatch.setattr(EfficientAD, "_teacher", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 4"):
        fit(textured_images(4, seed=0), max_steps=10)


# ------------------------------------------------------------------------------------ teacher weights
def test_a_tampered_bundled_teacher_is_refused(tmp_path, monkeypatch):
    bundled = pdn.bundled_teacher("small")
    tampered = tmp_path / bundled.file
    shutil.copy(bundled.path, tampered)
    data = bytearray(tampered.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    tampered.write_bytes(bytes(data))
    monkeypatch.setattr(bundled_files, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ModelFileError, match="tampered"):
        load_teacher("small")
    with pytest.raises(ModelFileError, match="tampered"):
        fit(textured_images(4, seed=0), max_steps=2)
    tampered.unlink()
    with pytest.raises(ModelFileError, match="missing"):
        load_teacher("small")


def test_the_bundled_teacher_is_the_recorded_file():
    teacher, digest = load_teacher("small")
    assert digest == pdn.BUNDLED_TEACHERS["small"].sha256
    info = pdn.teacher_file_metadata(pdn.bundled_teacher("small").path)
    assert info["backbone"] == "efficientnet_lite0" and info["pdn"] == "small"
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_a_model_refuses_a_teacher_file_other_than_its_own(tmp_path):
    from safetensors.torch import load_file, save_file

    own = tmp_path / "teacher.safetensors"
    shutil.copy(pdn.bundled_teacher("small").path, own)
    detector = fit(textured_images(4, seed=0), max_steps=2, teacher_weights=str(own))
    model = detector.save(tmp_path / "m.dlens")
    weights = load_file(str(own))
    weights["0.bias"] = weights["0.bias"] + 0.01
    save_file(weights, str(own))  # the user's teacher file changed after training
    with pytest.raises(ModelFileError, match="same teacher"):
        Detector.load(model)


# ------------------------------------------------------------------------------------ layout
def test_rolling_a_roll_out_band_rolls_the_local_map_exactly():
    bands = [np.roll(image, 8 * k, axis=1) for k, image in enumerate(textured_images(4, size=(32, 128), seed=0))]
    detector = fit(bands, image_size=(32, 128), circular_padding=True, max_steps=6)
    band = tensor(textured_images(1, size=(32, 128), seed=5))
    local, _ = detector.method.maps(band)
    rolled_local, _ = detector.method.maps(torch.roll(band, 40, dims=-1))  # 40 px = 10 PDN cells
    torch.testing.assert_close(torch.roll(local, 10, dims=-1), rolled_local, rtol=1e-4, atol=1e-6)
    plain = fit(bands, image_size=(32, 128), max_steps=6)
    plain_local, _ = plain.method.maps(band)
    plain_rolled, _ = plain.method.maps(torch.roll(band, 40, dims=-1))
    assert (torch.roll(plain_local, 10, dims=-1) - plain_rolled).abs().max() > 1e-3 * plain_local.abs().max()
    # the autoencoder's convolutions wrap too: its encoder features roll with the band (stride 32)
    encoder = detector.method.networks["autoencoder"].encoder[:-1]
    wide = torch.rand(1, 3, 64, 256)
    torch.testing.assert_close(torch.roll(encoder(wide), 2, dims=-1), encoder(torch.roll(wide, 64, dims=-1)))
    prediction = detector.predict(textured_images(1, size=(32, 128), seed=6)[0])
    assert prediction.anomaly_map.shape == (32, 128)


def test_tiling_scores_each_tile_and_stitches_the_map():
    images = textured_images(6, size=(96, 96), seed=0)
    detector = fit(images, image_size=96, tile_size=48, tile_overlap=16, max_steps=10)
    defective, mask = with_square_defect(textured_images(1, size=(96, 96), seed=9)[0], 60, 60, 14)
    good, bad = detector.predict_batch([textured_images(1, size=(96, 96), seed=5)[0], defective])
    assert bad.anomaly_map.shape == (96, 96) and bad.score > good.score
    assert mask[np.unravel_index(np.argmax(bad.anomaly_map), bad.anomaly_map.shape)]


def test_the_cli_offers_the_options(capsys):
    with pytest.raises(SystemExit):
        build_parser(["fit", "--method", "efficientad"]).parse_args(["fit", "--method", "efficientad", "--help"])
    text = capsys.readouterr().out
    for flag in ("--teacher-weights", "--pdn-size", "--map-normalization", "--hard-quantile", "--max-steps"):
        assert flag in text
    assert EfficientAD().max_steps == ead.DEFAULT_STEPS and EfficientAD().lr_schedule == "step"

"""Student-teacher (the reusable-food-packaging study): Eqs. 1-3, the hard-case loss and its
warm-up, augmentation and the four corruption models, few-shot fits, determinism, model
files, circular padding, tiling and the CLI - on tiny images and budgets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from defectlens.cli import main
from defectlens.data.defect_pairs import generated_defect_pairs, transfer_pairs
from defectlens.data.images import save_png
from defectlens.data.synthetic import make_synthetic_testset
from defectlens.detector import Detector
from defectlens.errors import ConfigError, DatasetError, ModelFileError, NonFiniteLossError
from defectlens.methods import student_teacher as st
from defectlens.methods.base import MethodContext
from defectlens.methods.student_teacher import StudentTeacher, hard_cosine_loss
from defectlens.samples import Batch
from tests.conftest import textured_images, with_square_defect

NO_CORRUPTION = dict(rotation_degrees=0.0, brightness=0.0, contrast=0.0, latent_noise_std=0.0, stain_probability=0.0)
FAST = dict(image_size=64, batch_size=4, blur_sigma=1.0, train_batch_size=4)


def save_images(folder, images) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, image in enumerate(images):
        paths.append(folder / f"{k:03d}.png")
        save_png(paths[-1], (np.clip(image, 0, 1) * 255).astype(np.uint8))
    return paths


def bound(**options) -> StudentTeacher:
    method = StudentTeacher(**options)
    method.bind(MethodContext(image_size=(64, 64)))
    return method


def batch_of(images) -> Batch:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return Batch(x, torch.arange(len(images)), [None] * len(images), [(64, 64)] * len(images))


@pytest.fixture(scope="module")
def fitted():
    """A student-teacher with the default (study) corruptions, fitted on 10 striped images."""
    return Detector(method="student_teacher", max_steps=40, **FAST).fit(textured_images(10, seed=0))


def test_a_pasted_defect_scores_higher_and_peaks_inside_it(fitted):
    summary = fitted.fit_info.method
    assert summary["steps"] == 40 and summary["corruptions"] == ["latent_noise", "stained_shapes"]
    losses = summary["loss_history"]["loss"]
    assert losses[19] < losses[9] < 0.85 * losses[0]  # it learns during the warm-up (the plain mean)
    defective, mask = with_square_defect(textured_images(1, seed=9)[0], 20, 30, 12)
    good, bad = fitted.predict_batch([textured_images(1, seed=5)[0], defective])
    assert bad.score > good.score
    assert mask[np.unravel_index(np.argmax(bad.anomaly_map), bad.anomaly_map.shape)]


def test_the_map_is_eqs_1_to_3_normalized_by_held_out_quantiles(fitted):
    method = fitted.method
    x = torch.from_numpy(np.stack(textured_images(2, seed=7))).permute(0, 3, 1, 2).contiguous()
    teacher, student = method.networks["teacher"](x), method.networks["student"](x)
    squared = [(torch.nn.functional.normalize(s, dim=1) - torch.nn.functional.normalize(t, dim=1)).double().pow(2).sum(1)
               for s, t in zip(student, teacher)]
    grid = squared[0].shape[-2:]
    fine = [torch.nn.functional.interpolate(m[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0] for m in squared]
    distance = -0.5 / len(fine) * sum(fine)  # Eq. 1, L = 2 layers
    heat = -torch.exp(distance)  # Eq. 2
    low, high = method.quantiles.tolist()
    torch.testing.assert_close(method.raw_map(x), heat)
    torch.testing.assert_close(method.patch_scores(x), ((heat - low) / (high - low)).float())  # Eq. 3
    assert -1.0 <= low < high < 0.0  # H = -exp(D) with D in [-2, 0]


def test_quantiles_come_from_held_out_images_only():
    images = textured_images(6, seed=3)
    detector = Detector(method="student_teacher", max_steps=3, quantile_a=0.5, quantile_b=0.9, **NO_CORRUPTION, **FAST)
    data = detector._fit_data(images, None)
    detector.method.fit_batches(data, None)
    held = torch.cat([batch.x for batch in data.held_out()])
    values = detector.method.patch_scores(held).flatten().double().numpy()
    assert np.quantile(values, 0.5) == pytest.approx(0.0, abs=1e-5)
    assert np.quantile(values, 0.9) == pytest.approx(1.0, abs=1e-5)


def test_hard_case_loss_keeps_the_top_fraction_of_locations():
    torch.manual_seed(0)
    student = [torch.randn(2, 5, 4, 4), torch.randn(2, 5, 2, 2)]
    teacher = [torch.randn(2, 5, 4, 4), torch.randn(2, 5, 2, 2)]
    distances = [(1 - torch.nn.functional.cosine_similarity(s, t, dim=1)).flatten() for s, t in zip(student, teacher)]
    plain = torch.stack([d.mean() for d in distances]).mean()
    torch.testing.assert_close(hard_cosine_loss(student, teacher, 0.0), plain)
    top_quarter = torch.stack([d.sort().values[-(d.numel() // 4):].mean() for d in distances]).mean()
    torch.testing.assert_close(hard_cosine_loss(student, teacher, 0.75), top_quarter)
    assert hard_cosine_loss(student, teacher, 0.75) > plain


def test_the_hard_case_loss_starts_after_the_warm_up(monkeypatch):
    used = []
    original = st.hard_cosine_loss
    monkeypatch.setattr(st, "hard_cosine_loss", lambda s, t, q: used.append(q) or original(s, t, q))
    Detector(method="student_teacher", max_steps=6, hard_start=0.5, hard_quantile=0.9, **NO_CORRUPTION, **FAST).fit(
        textured_images(4, seed=1))
    assert used[:6] == [0.0, 0.0, 0.0, 0.9, 0.9, 0.9]


def test_same_seed_gives_the_same_weights_and_scores():
    images = textured_images(5, seed=2)
    probe = textured_images(2, seed=8)
    runs = [Detector(method="student_teacher", max_steps=4, seed=3, **FAST).fit(images) for _ in range(2)]
    first, second = (run.method.state() for run in runs)
    assert first.keys() == second.keys() and "extra.quantiles" in first
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert [p.score for p in runs[0].predict_batch(probe)] == [p.score for p in runs[1].predict_batch(probe)]
    other = Detector(method="student_teacher", max_steps=4, seed=4, **FAST).fit(images).method.state()
    assert not torch.equal(other["student.network._conv_stem.weight"], first["student.network._conv_stem.weight"])


def test_save_and_load_give_identical_scores_and_maps(fitted, tmp_path):
    path = fitted.save(tmp_path / "st.dlens")
    loaded = Detector.load(path)
    assert loaded.method.config() == fitted.method.config()
    assert not any(name.startswith("teacher.") for name in fitted.method.state())  # rebuilt from the backbone
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


def test_a_model_file_with_a_tampered_student_weight_is_refused(fitted, tmp_path):
    path = fitted.save(tmp_path / "st.dlens")
    _tamper_one_weight(path, "student.")
    with pytest.raises(ModelFileError, match="checksum"):
        Detector.load(path)


def test_a_nan_loss_stops_training_naming_the_step(monkeypatch):
    calls = {"n": 0}
    original = st.hard_cosine_loss

    def poisoned(s, t, q):
        calls["n"] += 1
        loss = original(s, t, q)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(st, "hard_cosine_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        Detector(method="student_teacher", max_steps=6, **NO_CORRUPTION, **FAST).fit(textured_images(4, seed=1))


def test_a_single_image_is_enough():
    image = textured_images(1, seed=4)[0]
    detector = Detector(method="student_teacher", max_steps=5, **FAST).fit([image])
    assert detector.fit_info.method["steps"] == 5 and detector.method.quantiles is not None
    prediction = detector.predict(with_square_defect(image, 10, 10, 8)[0])
    assert np.isfinite(prediction.score) and prediction.anomaly_map.shape == (64, 64)


def test_student_init_teacher_starts_from_the_teachers_weights():
    method = bound(student_init="teacher")
    teacher, student = method.networks["teacher"].network.state_dict(), method.networks["student"].network.state_dict()
    assert all(torch.equal(teacher[key], student[key]) for key in teacher)
    random_student = bound().networks["student"].network.state_dict()
    assert not torch.equal(random_student["_conv_stem.weight"], teacher["_conv_stem.weight"])
    with pytest.raises(ConfigError, match="student_init"):
        StudentTeacher(student_init="imagenet")


# ---------------------------------------------------------------- augmentation and corruptions
def test_augmentation_is_shared_and_stains_only_reach_the_student():
    batch = batch_of(textured_images(4, seed=1)).x
    augmented = bound(**{**NO_CORRUPTION, "rotation_degrees": 10.0, "augmentation_probability": 1.0})
    teacher_view, student_view = augmented.views(batch, np.random.default_rng(0))
    assert torch.equal(teacher_view, student_view) and not torch.allclose(teacher_view, batch)
    stained = bound(**{**NO_CORRUPTION, "stain_probability": 1.0})
    teacher_view, student_view = stained.views(batch, np.random.default_rng(0))
    assert torch.equal(teacher_view, batch)
    changed = (student_view != batch).any(dim=1)
    assert all(0 < changed[k].float().mean() < 0.5 for k in range(4))  # a blob, not the whole image
    untouched = bound(**NO_CORRUPTION)
    assert all(view is batch for view in untouched.views(batch, np.random.default_rng(0)))


def test_latent_noise_perturbs_the_students_stem_of_the_chosen_samples_only():
    method = bound(**{**NO_CORRUPTION, "latent_noise_std": 0.5, "latent_noise_probability": 0.5})
    x = batch_of(textured_images(8, seed=1)).x
    student = method.networks["student"]
    clean = student(x)[0]
    rng = np.random.default_rng(3)
    chosen = np.random.default_rng(3).random(8) < 0.5
    with method._student_stem.perturbed(method.stem_perturbation(x, rng)):
        noisy = student(x)[0]
    differs = (noisy - clean).abs().flatten(1).amax(dim=1) > 1e-6
    assert 0 < chosen.sum() < 8 and differs.numpy().tolist() == chosen.tolist()


def transfer_folder(root, count: int = 3):
    """A tiny MVTec-layout category of another 'product': checkerboards with a dark square defect."""
    rows, cols = np.mgrid[0:48, 0:48]
    board = (((rows // 6 + cols // 6) % 2) * 0.6 + 0.2).astype(np.float32)
    good = [np.repeat(board[..., None], 3, axis=2) for _ in range(count)]
    save_images(root / "train" / "good", good)
    defective = [with_square_defect(image, 12 + 4 * k, 16, 12) for k, image in enumerate(good)]
    save_images(root / "test" / "dent", [d for d, _ in defective])
    masks = root / "ground_truth" / "dent"
    masks.mkdir(parents=True)
    for k, (_, mask) in enumerate(defective):
        save_png(masks / f"{k:03d}_mask.png", mask.astype(np.uint8) * 255)
    return root


def test_transfer_noise_adds_teacher_stem_differences_inside_the_defect(tmp_path):
    folder = transfer_folder(tmp_path / "other_product")
    pairs = transfer_pairs([folder], 4, seed=0)
    assert len(pairs) == 4 and all(pair.mask is not None and "dent" in str(pair.defective) for pair in pairs)
    assert transfer_pairs([tmp_path], 2, seed=0) == transfer_pairs([folder], 2, seed=0)  # a root of categories
    method = bound(**{**NO_CORRUPTION, "transfer_from": [str(folder)], "transfer_probability": 1.0, "transfer_pairs": 4})
    method.before_training(None)
    maps, teacher_std = method.transfer_noise((64, 64))
    assert maps.shape == (4, 32, 32, 32) and teacher_std > 0  # the stem: stride 2, 32 channels
    outside = maps.abs().amax(dim=1)
    assert (outside > 0).any() and ((outside > 0).float().mean(dim=(1, 2)) < 0.5).all()  # only near the defect
    x = batch_of(textured_images(2, seed=1)).x
    student = method.networks["student"]
    clean = student(x)[0]
    with method._student_stem.perturbed(method.stem_perturbation(x, np.random.default_rng(0))):
        transferred = student(x)[0]
    assert (transferred - clean).abs().amax() > 1e-4
    with pytest.raises(DatasetError):
        transfer_pairs([tmp_path / "missing"], 1, 0)


def test_transfer_noise_trains_from_the_cli_option(tmp_path):
    folder = transfer_folder(tmp_path / "other")
    data = tmp_path / "good"
    save_images(data, textured_images(4, seed=2))
    out = tmp_path / "st.dlens"
    assert main(["fit", "--method", "student_teacher", "--data", str(data), "--out", str(out), "--image-size", "64",
                 "--max-steps", "3", "--transfer-from", str(folder), "--hard-quantile", "0.9", "--student-init",
                 "teacher", "-q"]) == 0
    loaded = Detector.load(out)
    assert loaded.method.transfer_from == [str(folder)] and loaded.method.hard_quantile == 0.9
    assert loaded.method.student_init == "teacher" and "transfer_noise" in loaded.fit_info.method["corruptions"]


def test_generated_defects_show_the_student_the_defect_and_the_teacher_its_original(tmp_path):
    clean_images = textured_images(3, seed=6)
    defects = [with_square_defect(image, 8, 8, 10)[0] for image in clean_images]
    save_images(tmp_path / "pairs" / "clean", clean_images)
    save_images(tmp_path / "pairs" / "defect", defects)
    assert len(generated_defect_pairs(tmp_path / "pairs")) == 3
    method = bound(**{**NO_CORRUPTION, "generated_defects": str(tmp_path / "pairs"), "generated_probability": 1.0})
    method.before_training(None)
    batch = batch_of(textured_images(2, seed=1)).x
    teacher_view, student_view = method.views(batch, np.random.default_rng(0))
    saved_clean = torch.from_numpy((np.stack(clean_images) * 255).astype(np.uint8) / np.float32(255))  # as save_images
    for k in range(2):
        match = [torch.allclose(teacher_view[k].permute(1, 2, 0), c, atol=1e-6) for c in saved_clean]
        assert any(match)  # the teacher sees a clean original, not the training image
        assert (student_view[k] - teacher_view[k]).abs().amax(dim=0).gt(0.1).float().mean() == pytest.approx(100 / 4096)


def test_generated_defects_read_the_synth_command_output(tmp_path):
    sources = save_images(tmp_path / "good", textured_images(4, seed=2))
    make_synthetic_testset(sources, "stain", 3, tmp_path / "synth", seed=1)
    pairs = generated_defect_pairs(tmp_path / "synth")
    assert len(pairs) == 3 and all(pair.normal in sources and pair.mask is not None for pair in pairs)
    detector = Detector(method="student_teacher", max_steps=2, generated_defects=str(tmp_path / "synth"), **FAST)
    detector.fit(sources)
    assert "generated_defects" in detector.fit_info.method["corruptions"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="generated defects"):
        generated_defect_pairs(tmp_path / "empty")
    json.loads((tmp_path / "synth" / "synthetic_stain.json").read_text())  # the layout we read


# ---------------------------------------------------------------- geometry
def periodic_band(seed: int, width: int = 128) -> np.ndarray:
    """A band that is periodic in x (a roll-out): stripes of whole periods plus small noise."""
    rng = np.random.default_rng(seed)
    cols = np.arange(width)[None, :]
    rows = np.arange(32)[:, None]
    values = 0.5 + 0.3 * np.sin(2 * np.pi * 4 * cols / width) * np.cos(rows / 5.0)
    image = np.repeat(values[..., None], 3, axis=2) + rng.normal(0, 0.02, (32, width, 3))
    return np.clip(image, 0, 1).astype(np.float32)


def test_circular_padding_makes_the_map_roll_with_the_band():
    bands = [periodic_band(seed) for seed in range(4)]
    detector = Detector(method="student_teacher", image_size=(32, 128), circular_padding=True, max_steps=3,
                        batch_size=4, blur_sigma=1.0, **NO_CORRUPTION).fit(bands)
    test_band = periodic_band(10)
    rolled = np.roll(test_band, 32, axis=1)  # a multiple of every stride
    anomaly_map = detector.predict(test_band).anomaly_map
    back = np.roll(detector.predict(rolled).anomaly_map, -32, axis=1)
    np.testing.assert_allclose(back, anomaly_map, rtol=1e-3, atol=1e-4 * np.abs(anomaly_map).max())


def test_tiling_scores_full_resolution_images():
    images = textured_images(4, size=(128, 128), seed=0)
    detector = Detector(method="student_teacher", max_steps=20, tile_size=64, tile_overlap=16, **{**FAST, "image_size": 128})
    detector.fit(images)
    defective, mask = with_square_defect(textured_images(1, size=(128, 128), seed=5)[0], 90, 20, 14)
    prediction = detector.predict(defective)
    assert prediction.anomaly_map.shape == (128, 128)
    assert mask[np.unravel_index(np.argmax(prediction.anomaly_map), prediction.anomaly_map.shape)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_it_trains_and_scores_on_cuda():
    images = textured_images(4, seed=0)
    detector = Detector(method="student_teacher", device="cuda", max_steps=3, **FAST).fit(images)
    assert detector.method.networks["student"].mean.device.type == "cuda"
    assert np.isfinite(detector.predict(images[0]).score)

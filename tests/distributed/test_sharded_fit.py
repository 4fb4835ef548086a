"""Sharded fit on a two-node Ray cluster: PaDiM equals the single-process fit, Sequential
PatchCore's shard coresets meld as `meld` would, greedy PatchCore's composable coreset,
methods that cannot be sharded fit on one worker, and bad training images are reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf

from defectlens import distributed
from defectlens.calibration import Calibrator
from defectlens.cli import main
from defectlens.detector import Detector
from defectlens.errors import ImageReadError
from defectlens.distributed.fit import shard_indices
from defectlens.ops.moments import GaussianMoments
from defectlens.ops.streaming_coreset import meld
from defectlens.samples import FitData
from tests.distributed.conftest import IMAGE_SIZE

COMMON = dict(image_size=IMAGE_SIZE, batch_size=4, seed=2, calibration_folds=3)


def test_shard_moments_merge_to_the_single_pass_moments_and_ledoit_wolf():
    rng = np.random.default_rng(0)
    samples = rng.standard_normal((300, 5, 12)) @ rng.standard_normal((12, 12)) + 7.0  # (n, groups, dim), far from 0
    whole = GaussianMoments.of(samples)
    cuts = [0, 1, 40, 41, 200, 300]
    parts = [GaussianMoments.of(samples[a:b]) for a, b in zip(cuts, cuts[1:])]
    for merged in (GaussianMoments.merge_all(parts), GaussianMoments.merge_all(parts[::-1])):
        assert merged.count == 300
        for name in ("mean", "scatter", "cubic", "quartic"):
            expected = getattr(whole, name)
            assert np.abs(getattr(merged, name) - expected).max() <= 1e-12 * np.abs(expected).max()
    for group in range(5):  # scikit-learn's Ledoit-Wolf from the moments alone
        reference, _ = ledoit_wolf(samples[:, group] - samples[:, group].mean(0), assume_centered=True)
        np.testing.assert_allclose(whole.ledoit_wolf()[group], reference, rtol=1e-12, atol=1e-14)
    pooled, _ = ledoit_wolf((samples - samples.mean(0)).reshape(-1, 12), assume_centered=True)
    np.testing.assert_allclose(whole.pooled().ledoit_wolf()[0], pooled, rtol=1e-12, atol=1e-14)


def test_shards_are_contiguous_blocks_covering_every_image_once():
    blocks = shard_indices(11, 3)
    assert blocks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert shard_indices(2, 5) == [[0], [1]]


@pytest.mark.parametrize("options", [
    dict(covariance="full"), dict(covariance="tied"), dict(covariance="global"),
    dict(covariance="full", reduction="negated_pca"),
], ids=["full", "tied", "global", "full-negated_pca"])
def test_sharded_padim_equals_the_single_process_fit(options, address, train_images, test_images, one_thread):
    single = Detector(method="padim", reduced_dim=12, **options, **COMMON).fit(train_images)
    sharded = distributed.fit(Detector(method="padim", reduced_dim=12, **options, **COMMON), train_images, shards=3)
    # negated PCA: the lowest-variance eigenvectors of two float64 round-offs of one covariance
    # agree to ~1e-5 (small eigenvalue gaps), not to 1 float32 step
    tolerance = 1e-6 if options.get("reduction") is None else 1e-4
    expected, got = single.method.state(), sharded.method.state()
    if options.get("reduction") is None:
        assert torch.equal(got["projection"], expected["projection"])
    for name in ("projection", "mean", "precision"):
        scale = float(expected[name].abs().max())
        assert float((got[name] - expected[name]).abs().max()) <= tolerance * 8 * scale, name
    np.testing.assert_allclose(sharded.normal_scores.scores, single.normal_scores.scores, rtol=tolerance)
    assert sharded.threshold == pytest.approx(single.threshold, rel=tolerance)
    single_scores = [p.score for p in single.predict_batch(test_images)]
    np.testing.assert_allclose([p.score for p in sharded.predict_batch(test_images)], single_scores, rtol=tolerance)
    assert sharded.fit_info.num_images == 11 and sharded.fit_info.method["distributed"]["shard_images"] == [4, 4, 3]
    assert sharded.fit_info.calibration["held_out_training_images"] == 11


def test_fit_on_the_command_line_with_ray_and_shards(address, train_images, tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # a relative --data, which the workers (elsewhere) must still find
    data = Path("good")
    data.mkdir()
    for image in train_images[:6]:
        (data / image.name).symlink_to(image)
    options = ["--image-size", str(IMAGE_SIZE), "--batch-size", "4", "--seed", "2", "--calibration-folds", "3",
               "--reduced-dim", "12"]
    out = Path("sharded.dlens")
    assert main(["fit", "--method", "padim", *options, "--data", str(data), "--out", str(out), "--ray", address,
                 "--shards", "2", "-q"]) == 0
    assert "fitted padim on 6 images" in capsys.readouterr().out
    sharded = Detector.load(out)
    assert sharded.fit_info.method["distributed"]["shard_images"] == [3, 3]
    single = Detector(method="padim", reduced_dim=12, **COMMON).fit(sorted(data.glob("*.png")))
    for name, tensor in single.method.state().items():
        assert float((sharded.method.state()[name] - tensor).abs().max()) <= 1e-5 * float(tensor.abs().max()), name
    assert sharded.threshold == pytest.approx(single.threshold, rel=1e-6)


def test_sequential_patchcore_shard_coresets_meld_like_meld(address, train_images, test_images, tmp_path, one_thread):
    options = dict(method="sequential_patchcore", coreset_size=96, epochs=2, augmentation="light", **COMMON)
    sharded = distributed.fit(Detector(**options), train_images, shards=2)
    # the same two shard streams and meld, in this process
    reference = Detector(**options)
    banks, origins = [], []
    for shard in shard_indices(len(train_images), 2):
        method = reference.method.unfitted_copy()
        data = FitData(train_images, reference.preparation, reference.encode, reference.batch_size, reference.seed,
                       reference._augment, shard)
        method.fit_batches(data)
        assert set(method.bank_image_index.tolist()) <= set(shard)  # global image indices, this shard's
        banks.append(method.memory_bank)
        origins.append(method.bank_image_index)
    melded = meld(banks, 96, seed=reference.seed, max_epochs=10, origins=origins)
    assert torch.equal(sharded.method.memory_bank, melded.coreset())
    assert torch.equal(sharded.method.bank_image_index, melded.coreset_origin())
    assert {int(i) for i in sharded.method.bank_image_index} & set(range(6)) and \
        {int(i) for i in sharded.method.bank_image_index} & set(range(6, 11))  # both shards kept vectors
    # calibration scores computed by tasks = leave-one-image-out scores of the melded model here
    reference.method.bank.set_bank(melded.coreset().clone(), melded.coreset_origin().clone())
    data = FitData(train_images, reference.preparation, reference.encode, reference.batch_size, reference.seed)
    local = Calibrator(reference.chain, reference.preparation, None, 3, reference.seed).held_out_scores(reference.method, data)
    np.testing.assert_allclose(sharded.normal_scores.scores, np.sort(local), rtol=1e-5)
    # a model like any other: saved, loaded, same scores; it ranks defects above good parts
    loaded = Detector.load(sharded.save(tmp_path / "sharded.dlens"))
    scores = np.asarray([p.score for p in loaded.predict_batch(test_images)])
    np.testing.assert_allclose(scores, [p.score for p in sharded.predict_batch(test_images)], rtol=1e-6)
    assert scores[3:].mean() > scores[:3].mean()


def test_greedy_patchcore_shards_meld_to_the_single_process_size(address, train_images, one_thread):
    options = dict(method="patchcore", coreset_ratio=0.05, **COMMON)
    single = Detector(**options).fit(train_images)
    one_shard = distributed.fit(Detector(**options), train_images, shards=1, greedy_oversample=1.0)
    assert torch.equal(one_shard.method.memory_bank, single.method.memory_bank)  # one shard: the same coreset
    assert one_shard.threshold == pytest.approx(single.threshold, rel=1e-6)
    sharded = distributed.fit(Detector(**options), train_images, shards=3)
    assert sharded.method.memory_bank.shape == single.method.memory_bank.shape
    origin = set(sharded.method.bank_image_index.tolist())
    assert origin & {0, 1, 2, 3} and origin & {4, 5, 6, 7} and origin & {8, 9, 10}


def test_a_method_that_cannot_be_sharded_fits_on_one_worker(address, train_images, test_images, one_thread):
    single = Detector(method="spade", **COMMON).fit(train_images)
    remote = distributed.fit(Detector(method="spade", **COMMON), train_images, shards=3)
    assert remote.fit_info.method["distributed"]["on_one_worker"]
    assert remote.threshold == pytest.approx(single.threshold, rel=1e-6)
    np.testing.assert_allclose([p.score for p in remote.predict_batch(test_images)],
                               [p.score for p in single.predict_batch(test_images)], rtol=1e-6)


def test_a_bad_training_image_is_reported_as_in_one_process(address, train_images, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG truncated")
    with pytest.raises(ImageReadError, match="broken.png"):
        distributed.fit(Detector(method="padim", reduced_dim=8, **COMMON), [*train_images[:4], bad], shards=2)

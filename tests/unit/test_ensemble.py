"""Ensemble of methods and backbones: members normalized by held-out statistics, combined maps,
one model file, CLI options from the signature, bad configurations refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defectlens.cli import main
from defectlens.detector import Detector
from defectlens.errors import ConfigError

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "mvtec_ad" / "transistor"
MEMBERS = [{"method": "patchcore"}, {"method": "padim", "backbone": "mobilenet_v2", "options": {"reduced_dim": 40}}]
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")


def _paths(folder: str, count: int) -> list[str]:
    return [str(path) for path in sorted((DATA / folder).glob("*.png"))[:count]]


@pytest.fixture(scope="module")
def fitted() -> Detector:
    detector = Detector(method="ensemble", image_size=128, members=MEMBERS, calibration_split=0.25, seed=1)
    return detector.fit(_paths("train/good", 16))


def test_members_have_their_own_backbones_and_normalized_maps(fitted):
    patchcore, padim = fitted.method.methods
    assert patchcore.context.backbone == "efficientnet_lite0" and padim.context.backbone == "mobilenet_v2"
    assert padim.context.layers and padim.context.layers != patchcore.context.layers  # the member backbone's defaults
    unseen = fitted.preparation.to_tensor([fitted.preparation.prepare(p, 0)[0] for p in _paths("test/good", 6)])
    # on normal images no member saw, the z-maps are centred near 0 with unit spread; the raw maps are not
    for z_map in fitted.method.member_maps(unseen):
        assert abs(float(z_map.mean())) < 1.0 and 0.3 < float(z_map.std()) < 3.0
    means = fitted.method.normalization[:, 0]
    assert float(means.min()) > 1.0  # raw distances are far from 0: normalization did something


def test_a_defect_scores_higher_and_verdicts_follow_the_threshold(fitted):
    good = fitted.predict_batch(_paths("test/good", 6))
    bad = fitted.predict_batch(_paths("test/damaged_case", 6))
    assert np.median([p.score for p in bad]) > np.median([p.score for p in good])
    assert all(p.verdict == ("NOT OK" if p.score > fitted.threshold else "OK") for p in good + bad)
    assert good[0].anomaly_map.shape == (256, 256)  # maps come back at the image's own size


def test_mean_and_max_combine_the_same_member_maps(fitted):
    x = fitted.preparation.to_tensor([fitted.preparation.prepare(p, 0)[0] for p in _paths("test/damaged_case", 2)])
    mean_map = fitted.method.patch_scores(x)
    fitted.method.combine = "max"
    try:
        max_map = fitted.method.patch_scores(x)
    finally:
        fitted.method.combine = "mean"
    assert mean_map.shape == max_map.shape
    assert torch.all(max_map >= mean_map - 1e-5)


def test_one_model_file_gives_the_same_scores(fitted, tmp_path):
    paths = _paths("test/good", 2) + _paths("test/cut_lead", 2)
    loaded = Detector.load(fitted.save(tmp_path / "ensemble.dlens"))
    assert loaded.method.members == fitted.method.members
    before = [p.score for p in fitted.predict_batch(paths)]
    after = [p.score for p in loaded.predict_batch(paths)]
    np.testing.assert_allclose(after, before, rtol=1e-6)


def test_cli_fits_an_ensemble_from_a_json_members_option(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    for path in _paths("train/good", 6):
        (train / Path(path).name).write_bytes(Path(path).read_bytes())
    members = '[{"method": "patchcore"}, {"method": "padim", "options": {"reduced_dim": 20}}]'
    model = tmp_path / "m.dlens"
    code = main(["fit", "--data", str(train), "--method", "ensemble", "--members", members, "--combine", "max",
                 "--image-size", "64", "--calibration-split", "0.34", "--out", str(model), "-q"])
    assert code == 0
    loaded = Detector.load(model)
    assert loaded.method.combine == "max" and [m["method"] for m in loaded.method.members] == ["patchcore", "padim"]


@pytest.mark.parametrize("members, message", [
    ([{"method": "patchcore"}], "at least two members"),
    ([{"method": "patchcore"}, {"method": "nope"}], "unknown method"),
    ([{"method": "patchcore"}, {"method": "ensemble"}], "cannot be an ensemble"),
    ([{"method": "patchcore"}, {"method": "padim", "colour": 1}], "unknown key"),
    ([{"method": "patchcore"}, {"method": "padim", "backbone": "alexnet"}], "alexnet"),
    (["patchcore", "padim"], "must be a dict"),
])
def test_bad_members_are_refused_with_the_reason(members, message):
    with pytest.raises(ConfigError, match=message):
        Detector(method="ensemble", members=members)

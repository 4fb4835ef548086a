"""--threads / Detector(threads=N): what is set, where the option may stand, results unchanged."""

from __future__ import annotations

import os

import pytest
import torch

from defectlens import threads
from defectlens.cli import _take_threads
from defectlens.detector import Detector
from defectlens.errors import ConfigError
from tests.conftest import textured_images


@pytest.fixture
def restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    yield
    torch.set_num_threads(before)
    threads._CONFIGURED = None


def test_resolve_and_auto(monkeypatch):
    assert threads.resolve_threads(None) is None and threads.resolve_threads(0) is None
    assert threads.resolve_threads("3") == 3
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    assert threads.auto_threads() == 1  # a busy machine: one thread, never oversubscribe
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert threads.auto_threads() == threads.usable_cores()
    with pytest.raises(ConfigError):
        threads.resolve_threads("many")
    with pytest.raises(ConfigError):
        threads.resolve_threads(-2)


def test_option_may_stand_anywhere():
    assert _take_threads(["--threads", "2", "predict", "x.png"]) == (["predict", "x.png"], "2")
    assert _take_threads(["predict", "--model", "m", "--threads=1", "x.png"]) == (["predict", "--model", "m", "x.png"], "1")
    assert _take_threads(["fit", "--data", "d"]) == (["fit", "--data", "d"], "auto")


def test_auto_leaves_a_user_setting_alone(restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.set_threads("auto") is None and os.environ["OMP_NUM_THREADS"] == "2"


def test_detector_threads_set_torch_and_do_not_change_scores(restore_threads, tmp_path):
    images = textured_images(4, seed=0)
    one = Detector(method="padim", image_size=64, batch_size=4, threads=1)
    assert torch.get_num_threads() == 1 and threads.configured_threads() == 1
    scores_one = [p.score for p in one.fit(images).predict_batch(images)]
    two = Detector(method="padim", image_size=64, batch_size=4, threads=2)
    assert torch.get_num_threads() == 2
    scores_two = [p.score for p in two.fit(images).predict_batch(images)]
    assert scores_one == pytest.approx(scores_two, rel=1e-5)
    path = one.save(tmp_path / "m.dlens")
    assert Detector.load(path, threads=1).threads == 1 and Detector.load(path).threads is None  # not saved

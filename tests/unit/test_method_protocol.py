"""Adding a method touches its own file and one registry line - nothing in the CLI or the
detector. Shown by a toy method defined here: a tiny convolutional autoencoder trained on
images through `fit_batches` (the shared training loop), registered, fitted, served by the
CLI with its own options, saved and loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defectlens import methods
from defectlens.cli import build_parser, main
from defectlens.detector import Detector
from defectlens.methods.trained import TrainedMethod
from tests.conftest import textured_images, with_square_defect


class ToyAutoencoder(TrainedMethod):
    """A two-layer convolutional autoencoder; the anomaly map is the squared residual.

    Args:
        hidden_channels: channels of the bottleneck.
    """

    name = "toy_autoencoder"

    def __init__(self, hidden_channels: int = 8, max_steps: int = 60, learning_rate: float = 1e-2, **training) -> None:
        super().__init__(max_steps=max_steps, learning_rate=learning_rate, **training)
        self.hidden_channels = hidden_channels

    def build_networks(self) -> dict[str, nn.Module]:
        net = nn.Sequential(
            nn.Conv2d(3, self.hidden_channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(self.hidden_channels, 3, 4, stride=2, padding=1),
        )
        return {"autoencoder": net.to(self.device)}

    def training_step(self, batch) -> torch.Tensor:
        return F.mse_loss(self.networks["autoencoder"](batch.x), batch.x)

    @torch.no_grad()
    def patch_scores(self, x: torch.Tensor) -> torch.Tensor:
        return (self.networks["autoencoder"](x) - x).pow(2).mean(dim=1)


@pytest.fixture()
def registered(monkeypatch):
    monkeypatch.setitem(methods.METHODS, ToyAutoencoder.name, ToyAutoencoder)  # the one registry line
    return ToyAutoencoder.name


def test_a_toy_trained_method_fits_scores_saves_and_loads(registered, tmp_path):
    images = textured_images(10, seed=0)
    detector = Detector(method=registered, image_size=64, batch_size=4, blur_sigma=1.0, calibration_split=0.2)
    detector.fit(images)
    summary = detector.fit_info.method
    assert summary["steps"] == 60 and summary["stop_reason"] == "max_steps"
    losses = summary["loss_history"]["loss"]
    assert losses[-1] < 0.5 * losses[0]  # it learned
    assert detector.fit_info.calibration["num_scores"] == 2  # the held-out split, never fitted on
    defective, mask = with_square_defect(textured_images(1, seed=9)[0], 20, 30, 12)
    good, bad = detector.predict_batch([textured_images(1, seed=5)[0], defective])
    assert bad.score > good.score
    assert mask[np.unravel_index(np.argmax(bad.anomaly_map), bad.anomaly_map.shape)]

    loaded = Detector.load(detector.save(tmp_path / "toy.dlens"))
    assert loaded.method.config() == detector.method.config()
    again = loaded.predict_batch([textured_images(1, seed=5)[0], defective])
    assert [p.score for p in again] == [good.score, bad.score]
    np.testing.assert_array_equal(again[1].anomaly_map, bad.anomaly_map)


def test_same_seed_gives_the_same_weights(registered):
    images = textured_images(6, seed=1)
    first = Detector(method=registered, image_size=32, batch_size=3, seed=4).fit(images)
    second = Detector(method=registered, image_size=32, batch_size=3, seed=4).fit(images)
    for name, tensor in first.method.state().items():
        assert torch.equal(tensor, second.method.state()[name]), name


def test_the_cli_offers_the_method_and_its_options_without_an_edit(registered, tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_parser(["fit", "--method", registered]).parse_args(["fit", "--method", registered, "--help"])
    help_text = capsys.readouterr().out
    assert "toy_autoencoder options" in help_text and "--hidden-channels" in help_text and "--max-steps" in help_text
    data = tmp_path / "good"
    data.mkdir()
    from defectlens.data.images import save_png

    for k, image in enumerate(textured_images(4, seed=2)):
        save_png(data / f"{k}.png", (image * 255).astype(np.uint8))
    out = tmp_path / "toy.dlens"
    assert main(["fit", "--method", registered, "--data", str(data), "--out", str(out), "--image-size", "32",
                 "--hidden-channels", "4", "--max-steps", "5", "-q"]) == 0
    loaded = Detector.load(out)
    assert (loaded.method.hidden_channels, loaded.method.max_steps) == (4, 5)

"""CFlow-AD: the conditional flow's maths (log-determinant, inverse, likelihood), its positional
encoding, and the method end to end on small images (fit, save/load, seeds, a pasted defect)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from defectlens.cli import build_parser
from defectlens.detector import Detector
from defectlens.methods.cflow import CFlow, default_cflow_layers
from defectlens.networks.flows import ConditionalFlow, positional_encoding_2d
from defectlens.training import TrainingConfig, seeded, train
from tests.conftest import textured_images, with_square_defect

TINY = dict(coupling_blocks=4, condition_channels=16, fiber_batch_size=64, max_steps=300, learning_rate=2e-3)


def test_coupling_blocks_log_determinant_matches_the_autograd_jacobian_and_inverts():
    with seeded(0):
        flow = ConditionalFlow(4, condition_channels=8, coupling_blocks=3, seed=1).double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2.0
    condition = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    z, log_det = flow(x, condition)
    for row in range(5):
        jacobian = torch.autograd.functional.jacobian(lambda v: flow(v[None], condition[row : row + 1])[0][0], x[row])
        sign, expected = torch.linalg.slogdet(jacobian)
        assert sign > 0
        assert log_det[row].item() == pytest.approx(expected.item(), abs=1e-5)
    assert not torch.allclose(z, x)  # the blocks do transform
    torch.testing.assert_close(flow.inverse(z, condition), x, atol=1e-5, rtol=0)


def test_a_flow_trained_on_gaussian_data_learns_its_density():
    """Maximum likelihood on 4-D correlated Gaussian samples: the NLL of held-out samples
    approaches the true entropy and out-of-distribution samples get a far higher NLL."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.8, 0.6, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0], [0.3, 0.0, 0.2, 1.5]])
    mean = torch.tensor([2.0, -1.0, 0.5, 3.0])

    def sample(count: int) -> torch.Tensor:
        return torch.randn(count, 4, generator=generator) @ mixing.T + mean

    condition = torch.zeros(1, 4)
    with seeded(0):
        flow = ConditionalFlow(4, condition_channels=4, coupling_blocks=4, seed=0)
    data = sample(4096)

    def batches(epoch: int):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(data), 512):
            yield data[order[start : start + 512]]

    def nll(x: torch.Tensor) -> float:
        with torch.no_grad():
            return float(-flow.log_likelihood(x, condition.expand(len(x), -1)).mean())

    held_out = sample(2000)
    before = nll(held_out)
    train(flow.parameters(), lambda x: -flow.log_likelihood(x, condition.expand(len(x), -1)).mean(), batches,
          TrainingConfig(max_steps=300, learning_rate=5e-3, seed=0), modules=[flow])
    flow.eval()
    entropy = 0.5 * 4 * (1 + math.log(2 * math.pi)) + torch.logdet(mixing @ mixing.T).item() / 2
    after = nll(held_out)
    assert after < before - 1.0
    assert after == pytest.approx(entropy, abs=0.1)  # the true density's expected NLL
    outliers = held_out + torch.tensor([0.0, 0.0, 3.0, 0.0])  # 6 standard deviations along x3
    assert nll(outliers) > after + 10.0


def test_positional_encoding_is_cflows_and_periodic_on_request():
    encoding = positional_encoding_2d(16, 6, 10)
    assert encoding.shape == (16, 6, 10)
    # channel 0: sin(x * 1), channel 8: sin(y * 1) (CFlow's first frequency is 1)
    torch.testing.assert_close(encoding[0, 0], torch.sin(torch.arange(10.0)))
    torch.testing.assert_close(encoding[8, :, 0], torch.sin(torch.arange(6.0)))
    assert torch.equal(encoding[:8, 0], encoding[:8, 5])  # the x channels do not depend on the row ...
    periodic = positional_encoding_2d(16, 6, 10, periodic_x=True)
    step = (periodic[:8, 0, 1:] - periodic[:8, 0, :-1]).norm(dim=0)
    seam = (periodic[:8, 0, 0] - periodic[:8, 0, -1]).norm()
    assert seam.item() == pytest.approx(step[0].item(), rel=1e-5)  # ... and wrap around with periodic_x
    plain_seam = (encoding[:8, 0, 0] - encoding[:8, 0, -1]).norm()
    assert plain_seam.item() > 2 * (encoding[:8, 0, 1] - encoding[:8, 0, 0]).norm().item()
    torch.testing.assert_close(periodic[8:], encoding[8:])  # y is unchanged


def test_default_layers_are_three_scales_of_the_backbone():
    assert default_cflow_layers("efficientnet_lite0") == ("_blocks.4", "_blocks.10", "_blocks.14")


@pytest.fixture(scope="module")
def fitted() -> Detector:
    return Detector(method="cflow", image_size=96, batch_size=4, blur_sigma=2.0, seed=3, **TINY).fit(
        textured_images(12, size=(96, 96), seed=0))


def test_cflow_learns_saves_loads_and_finds_a_pasted_defect(fitted, tmp_path):
    summary = fitted.fit_info.method
    assert summary["steps"] == TINY["max_steps"]
    losses = summary["loss_history"]["loss"]
    assert losses[-1] < losses[0] - 0.5  # it learned
    assert fitted.method.log_likelihood_max.shape == (3,)
    normal = textured_images(3, size=(96, 96), seed=7)
    defective, mask = with_square_defect(textured_images(1, size=(96, 96), seed=9)[0], 40, 48, 20)
    predictions = fitted.predict_batch([*normal, defective])
    assert predictions[-1].score > max(p.score for p in predictions[:-1])
    anomaly_map = predictions[-1].anomaly_map
    assert mask[np.unravel_index(np.argmax(anomaly_map), anomaly_map.shape)]
    assert anomaly_map[mask].mean() > anomaly_map[~mask].mean()

    loaded = Detector.load(fitted.save(tmp_path / "cflow.dlens"))
    assert loaded.method.config() == fitted.method.config()
    again = loaded.predict_batch([*normal, defective])
    assert [p.score for p in again] == [p.score for p in predictions]
    np.testing.assert_array_equal(again[-1].anomaly_map, anomaly_map)


def test_the_same_seed_gives_the_same_flows_and_scores():
    images = textured_images(6, size=(64, 64), seed=1)
    options = dict(image_size=64, batch_size=3, seed=5, coupling_blocks=2, condition_channels=8, fiber_batch_size=32, max_steps=12)
    first = Detector(method="cflow", **options).fit(images)
    second = Detector(method="cflow", **options).fit(images)
    state = first.method.state()
    assert not any(name.startswith("encoder.") for name in state)  # the frozen encoder is rebuilt, not saved
    for name, tensor in state.items():
        assert torch.equal(tensor, second.method.state()[name]), name
    probe = textured_images(2, size=(64, 64), seed=8)
    assert [p.score for p in first.predict_batch(probe)] == [p.score for p in second.predict_batch(probe)]
    other = Detector(method="cflow", **{**options, "seed": 6}).fit(images)
    permutation = next(name for name in state if name.endswith(".w_perm"))  # FrEIA's random rotation
    assert not torch.equal(other.method.state()[permutation], state[permutation])


def test_circular_padding_and_tiling_are_served(tmp_path):
    images = textured_images(4, size=(64, 96), seed=2)
    options = dict(batch_size=2, coupling_blocks=2, condition_channels=8, fiber_batch_size=32, max_steps=4)
    band = Detector(method="cflow", image_size=(64, 96), circular_padding=True, **options).fit(images)
    assert band.method.position_encoding(4, 6)[0, 0, 0] == pytest.approx(0.0)  # sin(2 pi 0 / w)
    scores = band.predict_batch(images[:2])
    assert all(np.isfinite(p.anomaly_map).all() for p in scores)
    tiled = Detector(method="cflow", image_size=(64, 96), tile_size=48, tile_overlap=16, **options).fit(images)
    prediction = tiled.predict(images[0])
    assert prediction.anomaly_map.shape == (64, 96) and np.isfinite(prediction.score)
    assert Detector.load(tiled.save(tmp_path / "tiled.dlens")).predict(images[0]).score == prediction.score


def test_the_cli_offers_cflows_options(capsys):
    with pytest.raises(SystemExit):
        build_parser(["fit", "--method", "cflow"]).parse_args(["fit", "--method", "cflow", "--help"])
    text = capsys.readouterr().out
    for flag in ("--coupling-blocks", "--condition-channels", "--clamp-alpha", "--fiber-batch-size", "--encoder-layers"):
        assert flag in text
    assert CFlow().learning_rate == 2e-4  # the paper's

"""Networks and maths of the PET-study methods: circular transposed convolutions, the FPN decoder,
the SSIM autoencoder, FCDD's receptive-field Gaussian upsampling and its HSC loss, outlier exposure."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from defectlens.backbones.features import make_padding_circular_in_x
from defectlens.data.outlier_exposure import expose_outliers
from defectlens.data.synthetic import blackened_confetti_noise
from defectlens.errors import ConfigError
from defectlens.methods.fcdd import blackened_confetti_outliers
from defectlens.networks.conv_autoencoder import ConvAutoencoder, encoder_layers
from defectlens.networks.encoder import PretrainedEncoder
from defectlens.networks.fpn import FPNDecoder, build_encoder_fpn, fpn_layers
from defectlens.networks.receptive_upsample import GaussianUpsample, receptive_field
from defectlens.ops.hsc import hsc_loss, hsc_pixel_loss, pseudo_huber


# ------------------------------------------------------------------ circular ConvTranspose2d
@pytest.mark.parametrize(
    "kernel, stride, padding, output_padding, dilation",
    [(4, 2, 1, 0, 1), (3, 2, 1, 1, 1), (5, 2, 2, 1, 1), (3, 2, 2, 1, 2), (8, 4, 2, 0, 1), (68, 8, 30, 0, 1)],
)
@pytest.mark.parametrize("width", [9, 3])
def test_circular_transposed_conv_equals_the_zero_padded_layer_on_a_repeated_input(
    kernel: int, stride: int, padding: int, output_padding: int, dilation: int, width: int
) -> None:
    torch.manual_seed(0)
    plain = nn.ConvTranspose2d(3, 2, kernel, stride, padding, output_padding, dilation=dilation)
    circular = copy.deepcopy(plain)
    make_padding_circular_in_x(circular)
    x = torch.randn(2, 3, 5, width)
    wrapped = circular(x)
    # far from the ends of five periods, the zero-padded layer sees an endless periodic input
    reference = plain(torch.cat([x] * 5, dim=-1))[..., 2 * width * stride : 3 * width * stride]
    assert wrapped.shape == plain(x).shape
    torch.testing.assert_close(wrapped, reference, rtol=1e-5, atol=1e-5)
    # and it is periodic: rolling the input by one column rolls the output by `stride`
    torch.testing.assert_close(circular(torch.roll(x, 1, dims=-1)), torch.roll(wrapped, stride, dims=-1),
                               rtol=1e-5, atol=1e-5)
    assert circular.state_dict().keys() == plain.state_dict().keys()


def test_circular_transposed_conv_refuses_a_layer_whose_output_is_not_one_period() -> None:
    with pytest.raises(ConfigError, match="stride"):
        make_padding_circular_in_x(nn.ConvTranspose2d(2, 2, 5, stride=2, padding=1))
    unpadded = nn.ConvTranspose2d(2, 2, 8)  # no padding, nothing to wrap: left as it is
    make_padding_circular_in_x(unpadded)
    assert unpadded(torch.zeros(1, 2, 1, 1)).shape == (1, 2, 8, 8)


# ------------------------------------------------------------------ FPN decoder and SCAE
def test_fpn_decoder_inverts_every_stage_to_input_resolution() -> None:
    assert fpn_layers("efficientnet_lite0") == ["_blocks.0", "_blocks.2", "_blocks.4", "_blocks.10", "_blocks.15"]
    encoder, decoder = build_encoder_fpn("efficientnet_lite0", 3)
    assert encoder.strides == [2, 4, 8, 16, 32] and not any(p.requires_grad for p in encoder.parameters())
    x = torch.rand(2, 3, 96, 64)
    assert decoder(encoder(x), (96, 64)).shape == (2, 3, 96, 64)
    # sides that are no multiple of 32: the encoder rounds up, the decoder crops back
    assert decoder(encoder(torch.rand(1, 3, 70, 50)), (70, 50)).shape == (1, 3, 70, 50)
    with pytest.raises(ConfigError, match="skip_strides"):
        build_encoder_fpn("efficientnet_lite0", 1, skip_strides=[3])


def test_fpn_decoder_skips_are_used_only_where_asked() -> None:
    torch.manual_seed(0)
    decoder = FPNDecoder([4, 8], [2, 4], 1, skips=[False, True])
    features = [torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4)]
    changed = [features[0] + 5.0, features[1]]
    torch.testing.assert_close(decoder(changed, (16, 16)), decoder(features, (16, 16)))  # level 0 unused
    with_skip = FPNDecoder([4, 8], [2, 4], 1)
    assert not torch.allclose(with_skip(changed, (16, 16)), with_skip(features, (16, 16)))


def test_ssim_autoencoder_network_follows_bergmann_with_a_1x1_code() -> None:
    assert len(encoder_layers((128, 128))) == 8 and len(encoder_layers((256, 256))) == 9
    net = ConvAutoencoder((256, 256), latent_dim=100)
    code = net.encoder(torch.rand(1, 3, 256, 256))
    assert code.shape == (1, 100, 1, 1)
    with torch.no_grad():
        out = net(torch.rand(2, 3, 256, 256))
    assert out.shape == (2, 3, 256, 256) and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    with pytest.raises(ConfigError):
        ConvAutoencoder((100, 100))


# ------------------------------------------------------------------ FCDD parts
def test_receptive_field_of_efficientnet_lite0_levels() -> None:
    encoder = PretrainedEncoder(layers=["_blocks.4"])
    # stem 3x3/2: 3; block0 dw3: 7; block1 dw3/2: 11; block2: 19; block3 dw5/2: 35; block4 dw5: 67
    assert [receptive_field(encoder.network, f"_blocks.{k}") for k in range(5)] == [7, 11, 19, 35, 67]


def test_gaussian_upsampling_centres_each_cell_and_keeps_constants() -> None:
    upsample = GaussianUpsample(stride=8, receptive_field=67, sigma=8.0)
    assert upsample.kernel_size == 68  # K - s even
    constant = upsample(torch.ones(1, 1, 12, 12))
    assert constant.shape == (1, 1, 96, 96)
    torch.testing.assert_close(constant[..., 32:64, 32:64], torch.ones(1, 1, 32, 32), rtol=1e-4, atol=1e-4)
    impulse = torch.zeros(1, 1, 12, 12)
    impulse[0, 0, 5, 7] = 1.0
    spread = upsample(impulse)[0, 0]
    peak = spread.max()
    rows, cols = torch.nonzero(spread == peak, as_tuple=True)
    assert set(rows.tolist()) == {43, 44} and set(cols.tolist()) == {59, 60}  # centre 5 * 8 + 3.5, 7 * 8 + 3.5
    # a Gaussian of sigma 8 about x = 59.5: pixel 59 is 0.5 px from the centre, pixel 67 is 7.5 px
    assert float(spread[43, 67] / peak) == pytest.approx(math.exp(-0.5 * (7.5**2 - 0.5**2) / 64), rel=1e-4)


def test_circular_gaussian_upsampling_wraps_around() -> None:
    upsample = GaussianUpsample(stride=8, receptive_field=67, sigma=8.0)
    make_padding_circular_in_x(upsample)
    impulse = torch.zeros(1, 1, 4, 8)
    impulse[0, 0, 2, 0] = 1.0
    spread = upsample(impulse)[0, 0]
    assert spread.shape == (32, 64)
    torch.testing.assert_close(spread[:, 3], spread[:, 4])  # centre at 3.5
    torch.testing.assert_close(spread[:, 0], spread[:, 7])
    torch.testing.assert_close(spread[:, 63], spread[:, 8])  # one pixel left of 0 = the last column


def test_hsc_loss_is_the_mean_for_normal_and_minus_log_for_anomalous_images() -> None:
    maps = torch.tensor([[[1.0, 1.0]], [[0.5, 1.5]], [[3.0, 3.0]]])  # means 1, 1, 3
    assert float(hsc_loss(maps, torch.tensor([0, 0, 0]))) == pytest.approx(5 / 3)
    expected = (1.0 - math.log(1 - math.exp(-1.0)) - math.log(1 - math.exp(-3.0))) / 3
    assert float(hsc_loss(maps, torch.tensor([0, 1, 1]))) == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(hsc_loss(torch.zeros(1, 2, 2), torch.tensor([1])))  # no inf at a zero map
    torch.testing.assert_close(pseudo_huber(torch.tensor([0.0, 3.0, -4.0])), torch.tensor([0.0, math.sqrt(10) - 1, math.sqrt(17) - 1]))


def test_hsc_pixel_loss_uses_the_masks() -> None:
    """FCDD Eq. 3: normal pixels (also of outlier images) are pulled down; the anomalous term
    -log(1 - exp(-mean(Y * A))) counts only for images with an anomalous pixel."""
    maps = torch.tensor([[[2.0, 0.0, 0.0, 0.0]], [[4.0, 1.0, 1.0, 2.0]]])  # (2, 1, 4)
    masks = torch.tensor([[[0.0, 0.0, 0.0, 0.0]], [[1.0, 0.0, 0.0, 0.0]]])
    expected = (2.0 / 4 + (1.0 + 1.0 + 2.0) / 4 - math.log(1 - math.exp(-4.0 / 4))) / 2
    assert float(hsc_pixel_loss(maps, masks)) == pytest.approx(expected, rel=1e-6)
    high_everywhere = torch.full((1, 1, 4), 3.0)  # Eq. 2's constant-map way out costs here
    assert float(hsc_pixel_loss(high_everywhere, masks[1:])) > float(hsc_pixel_loss(maps[1:] * masks[1:], masks[1:]))
    assert torch.isfinite(hsc_pixel_loss(torch.zeros(1, 2, 2), torch.ones(1, 2, 2)))  # no inf at a zero map


def test_outlier_exposure_draws_blackened_confetti_with_at_most_two_shapes() -> None:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(0.3, 0.9, size=(64, 3, 48, 48)).astype(np.float32))
    torch.manual_seed(3)
    exposed = blackened_confetti_outliers(images, fraction=0.5, max_anomalies=2)
    chosen = exposed.labels.bool()
    assert 20 <= int(chosen.sum()) <= 44  # about half of 64
    for row in range(images.shape[0]):
        changed = (exposed.images[row] != images[row]).any(dim=0)
        assert torch.equal(changed, exposed.masks[row])
        if not chosen[row]:
            assert not changed.any()
            continue
        assert torch.all(exposed.images[row][:, changed] == 0.0)  # black
        assert 1 <= ndimage.label(changed.numpy())[1] <= 2
    torch.manual_seed(3)
    again = blackened_confetti_outliers(images, fraction=0.5, max_anomalies=2)
    assert torch.equal(again.images, exposed.images)


def test_outlier_exposure_labels_an_image_that_did_not_change_as_normal() -> None:
    black = torch.zeros(4, 3, 32, 32)
    exposed = expose_outliers(black, blackened_confetti_noise, 0.99, seed=1)
    assert not exposed.labels.any() and not exposed.masks.any()

"""The symmetric convolutional autoencoder (SCAE) of Bergmann et al. (VISAPP 2019, "Improving
unsupervised defect segmentation by applying structural similarity to autoencoders"), trained
from scratch.

Encoder (Bergmann's Table 1 for 128 px; every extra factor of two in the input side adds one
more 4x4 stride-2 convolution in front, so the grid before the bottleneck stays 8 px on the
shorter side, e.g. one more layer at 256 px as the MVTec AD paper does for objects):

    [conv 4x4/2, 32] * (n - 4)   (extra stages)
    conv 4x4/2, 32 -> conv 4x4/2, 32 -> conv 3x3/1, 32 -> conv 4x4/2, 64 -> conv 3x3/1, 64
    -> conv 4x4/2, 128 -> conv 3x3/1, 64 -> conv 3x3/1, 32 -> conv (grid)/valid, latent_dim

i.e. an 8 x 8 (x aspect) grid reduced to a 1 x 1 x d code. The decoder mirrors it: a
transposed convolution from the code back to the grid, then each encoder layer reversed
(strided convolutions as 4x4/2 transposed convolutions, 3x3 convolutions as 3x3 convolutions).
LeakyReLU(0.2) after every layer but the code and the output; the output is a sigmoid (images
in [0, 1]).

(N, 3, H, W) -> (N, 3, H, W); H and W multiples of 2^n (n stride-2 stages). Circular padding:
`make_padding_circular_in_x` converts every padded layer; the code layer and its inverse have
no padding (a global code is not periodic; the convolutions around it are).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from defectlens.errors import ConfigError

BERGMANN_LAYERS: tuple[tuple[int, int, int], ...] = (
    (32, 4, 2), (32, 4, 2), (32, 3, 1), (64, 4, 2), (64, 3, 1), (128, 4, 2), (64, 3, 1), (32, 3, 1),
)
"""(out channels, kernel, stride) of the 128-px encoder before the code layer (Bergmann et al. Table 1)."""

BOTTLENECK_SIDE = 8
"""Pixels on the shorter side of the grid the code layer sees."""


def encoder_layers(image_size: tuple[int, int]) -> tuple[tuple[int, int, int], ...]:
    """Bergmann's layers, with one more 4x4/2 convolution per extra factor of two of the input."""
    shorter = min(image_size)
    stages = math.log2(shorter / BOTTLENECK_SIDE)
    if stages < 4 or stages != int(stages):
        raise ConfigError(
            f"the SSIM autoencoder needs a shorter image side of 128, 256, 512 ... px (8 * 2^n, n >= 4), got {image_size}")
    extra = int(stages) - 4
    return ((32, 4, 2),) * extra + BERGMANN_LAYERS


class ConvAutoencoder(nn.Module):
    """Symmetric convolutional autoencoder with a 1 x 1 x ``latent_dim`` code.

    Args:
        image_size: (height, width) of the input, e.g. (256, 256).
        latent_dim: size of the code (Bergmann: 100).
        in_channels: image channels.
    """

    def __init__(self, image_size: tuple[int, int], latent_dim: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        layers = encoder_layers(image_size)
        total_stride = math.prod(stride for _, _, stride in layers)
        if image_size[0] % total_stride or image_size[1] % total_stride:
            raise ConfigError(f"the SSIM autoencoder needs sides that are multiples of {total_stride}, got {image_size}")
        grid = (image_size[0] // total_stride, image_size[1] // total_stride)
        encoder: list[nn.Module] = []
        channels = in_channels
        for out_channels, kernel, stride in layers:
            encoder += [nn.Conv2d(channels, out_channels, kernel, stride, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            channels = out_channels
        encoder.append(nn.Conv2d(channels, latent_dim, grid))  # the code: 1 x 1 x latent_dim
        decoder: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, channels, grid), nn.LeakyReLU(0.2, inplace=True)]
        inputs = [in_channels] + [out_channels for out_channels, _, _ in layers[:-1]]
        for index in reversed(range(len(layers))):  # encoder layer `index`, inverted
            out_channels, _, stride = layers[index]
            if stride == 2:
                decoder.append(nn.ConvTranspose2d(out_channels, inputs[index], 4, stride=2, padding=1))
            else:
                decoder.append(nn.Conv2d(out_channels, inputs[index], 3, padding=1))
            decoder.append(nn.Sigmoid() if index == 0 else nn.LeakyReLU(0.2, inplace=True))
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)
        self.to(memory_format=torch.channels_last)  # oneDNN: faster (transposed) convolutions on CPU

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] -> reconstruction (N, 3, H, W) in [0, 1]."""
        return self.decoder(self.encoder(images.contiguous(memory_format=torch.channels_last)))

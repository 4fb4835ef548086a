"""EfficientAD's autoencoder (Batzner et al., WACV 2024, appendix A, Table 8): the logical branch.

It reconstructs the teacher's 384-channel map of the whole image through a 64-number
bottleneck, so it models the global layout of a normal image (a missing or misplaced part is
a "logical" anomaly the local student-teacher pair cannot see)::

    encoder  EncConv-1..5  4x4, stride 2, pad 1, ReLU (32, 32, 64, 64, 64 channels)
             EncConv-6     8x8, 64 channels, no padding          -> (N, 64, 1, 1)
    decoder  Bilinear to 3, 8, 15, 32, 63, 127 px, each then DecConv 4x4, 64, pad 2, ReLU,
             Dropout 0.2
             Bilinear to the PDN's output grid, DecConv-7 3x3, 64, pad 1, ReLU,
             DecConv-8 3x3, 384, pad 1                            -> (N, 384, h, w)

Upsampling is bilinear resizing followed by a convolution (no transposed convolutions).
The network always works at ``input_size`` (the paper's 256 x 256): model inputs of another
size are resized to it first (the bottleneck's 8x8 kernel is a parameter shape, so the
encoder needs one input size), and the decoder's last resize goes to the PDN grid of the actual
input, e.g. 32 x 32 for a 128 px PIPED patch. Intermediate decoder sizes scale with
``input_size`` as in the reference code (H/64 - 1, H/32, H/16 - 1, H/8, H/4 - 1, H/2 - 1).
With ``circular_padding`` every padded layer and every resize wraps around in x; the
bottleneck is one vector for the whole image, so the global branch is, by design, not
equivariant to rolls of a band.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defectlens.backbones.features import resize_bilinear_circular_x
from defectlens.backbones.registry import IMAGENET_MEAN, IMAGENET_STD
from defectlens.networks.periodic import PeriodicConv2d, PeriodicResize, set_circular_x

AUTOENCODER_INPUT_SIZE = 256


def decoder_sizes(input_size: int) -> list[int]:
    """Sizes (px) the decoder resizes to before each 4x4 convolution: [3, 8, 15, 32, 63, 127] at 256."""
    sizes = [input_size // 64 - 1, input_size // 32, input_size // 16 - 1, input_size // 8, input_size // 4 - 1,
             input_size // 2 - 1]
    return [max(1, size) for size in sizes]


class EfficientADAutoencoder(nn.Module):
    """The paper's autoencoder.

    Args:
        out_channels: channels of the output (the teacher's, 384).
        input_size: side the image is resized to before the encoder (the paper's 256; a
            multiple of 32 of at least 64).
        circular_padding: wrap around in x (roll-out bands).

    ``forward(images, output_size)``: (N, 3, H, W) RGB in [0, 1] -> (N, out_channels, *output_size).
    """

    def __init__(self, out_channels: int = 384, input_size: int = AUTOENCODER_INPUT_SIZE,
                 circular_padding: bool = False) -> None:
        super().__init__()
        if input_size < 64 or input_size % 32:
            raise ValueError(f"the autoencoder's input size must be a multiple of 32 and >= 64, got {input_size}")
        self.input_size = int(input_size)
        self.circular_padding = bool(circular_padding)
        bottleneck = input_size // 32  # the grid left after five stride-2 convolutions: 8 at 256 px
        self.encoder = nn.Sequential(
            PeriodicConv2d(3, 32, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            PeriodicConv2d(32, 32, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            PeriodicConv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            PeriodicConv2d(64, 64, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            PeriodicConv2d(64, 64, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, bottleneck),  # global: stays one vector when periodic in x
        )
        decoder: list[nn.Module] = []
        for size in decoder_sizes(input_size):
            decoder += [PeriodicResize((size, size)), PeriodicConv2d(64, 64, 4, padding=2), nn.ReLU(inplace=True),
                        nn.Dropout(0.2)]
        self.decoder = nn.Sequential(*decoder)
        self.head = nn.Sequential(
            PeriodicConv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True), PeriodicConv2d(64, out_channels, 3, padding=1),
        )
        if circular_padding:
            set_circular_x(self)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _resize(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        if self.circular_padding:
            return resize_bilinear_circular_x(x, size)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, images: Tensor, output_size: tuple[int, int]) -> Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, out_channels, *output_size) (the PDN grid of the input)."""
        x = (images - self.mean) / self.std
        x = self._resize(x, (self.input_size, self.input_size))
        x = self.decoder(self.encoder(x))
        return self.head(self._resize(x, tuple(output_size)))

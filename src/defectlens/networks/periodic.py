"""Convolutions, average pools and bilinear resizes that can be periodic in x (roll-out bands).

Each layer here behaves exactly like its torch counterpart until ``circular_x`` is set. Then
its x padding wraps around instead of adding zeros, and it is laid out so that a periodic input
of width W gives a periodic output of width ceil(W / stride) whose column j sees the same input
columns as the zero-padded layer's column j (y padding is unchanged: zeros).

Why not `backbones.features.make_padding_circular_in_x`: that wraps the layer's padding ``p``
on both sides, which is right for odd kernels with "same" padding (the backbones) but not for the
even kernels of EfficientAD's networks: a 4x4 convolution with padding 3 makes W + 3 columns, of
which the last three repeat the first ones, and the next layer then wraps the wrong columns. Here
a layer with kernel k, stride s and padding p wraps p columns on the left and k - s - p (at
least 0) on the right, so its output has exactly ceil(W / s) columns, one period.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defectlens.backbones.efficientnet_lite import pad_circular_x
from defectlens.backbones.features import resize_bilinear_circular_x


def periodic_x_padding(kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """(left, right) columns to wrap so that a periodic input of width W gives ceil(W / s) columns.

    Left is the layer's own padding (the zero-padded layer's alignment); right makes the padded
    width W - s + k (what the floor in the output size needs): k - s - p, at least 0.
    """
    return padding, max(0, kernel - stride - padding)


def wrap_x(x: Tensor, left: int, right: int) -> Tensor:
    """(N, C, H, W) -> (N, C, H, left + W + right), padded by wrapping around in x (any amounts,
    also more than W: a 1-pixel-wide map wraps onto itself)."""
    width = x.shape[-1]
    if left <= width and right <= width:
        return pad_circular_x(x, left, right)
    index = torch.arange(-left, width + right, device=x.device).remainder(width)
    return x.index_select(-1, index)


class PeriodicConv2d(nn.Conv2d):
    """`nn.Conv2d` (zero padding) whose x padding wraps around once ``circular_x`` is set.

    Parameter names are nn.Conv2d's, so plain Conv2d state dicts load unchanged.
    (N, C_in, H, W) -> (N, C_out, H', W') with H' as nn.Conv2d; W' = nn.Conv2d's width, or
    ceil(W / stride) when circular.
    """

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - nn.Conv2d's signature
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("PeriodicConv2d takes integer zero padding only")
        self.circular_x = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.circular_x:
            return super().forward(x)
        left, right = periodic_x_padding(self.kernel_size[1], self.stride[1], self.padding[1])
        x = wrap_x(x, left, right)
        return F.conv2d(x, self.weight, self.bias, self.stride, (self.padding[0], 0), self.dilation, self.groups)


class PeriodicAvgPool2d(nn.AvgPool2d):
    """`nn.AvgPool2d` (zero padding counted in the mean) whose x padding wraps once ``circular_x`` is set."""

    def __init__(self, kernel_size: int, stride: int, padding: int = 0) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode=False, count_include_pad=True)
        self.circular_x = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.circular_x:
            return super().forward(x)
        kernel, stride, padding = (int(v) for v in (self.kernel_size, self.stride, self.padding))
        left, right = periodic_x_padding(kernel, stride, padding)
        x = wrap_x(x, left, right)
        return F.avg_pool2d(x, kernel, stride, (padding, 0), ceil_mode=False, count_include_pad=True)


class PeriodicResize(nn.Module):
    """Bilinear resize (align_corners=False) of (N, C, h, w) to (N, C, *size), interpolating
    across the x seam (the input is one period) once ``circular_x`` is set."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.circular_x = False

    def forward(self, x: Tensor) -> Tensor:
        if self.circular_x:
            return resize_bilinear_circular_x(x, self.size)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


PERIODIC_LAYERS = (PeriodicConv2d, PeriodicAvgPool2d, PeriodicResize)


def set_circular_x(network: nn.Module, circular: bool = True) -> None:
    """Switch every periodic layer of ``network`` to wrap around in x (or back).

    Raises ValueError for a padded torch layer that is not one of `PERIODIC_LAYERS` (it would
    leave a seam).
    """
    for name, module in network.named_modules():
        if isinstance(module, PERIODIC_LAYERS):
            module.circular_x = circular
        elif isinstance(module, (nn.Conv2d, nn.AvgPool2d, nn.MaxPool2d, nn.ConvTranspose2d, nn.Upsample)):
            padding = getattr(module, "padding", 0)
            if isinstance(module, (nn.ConvTranspose2d, nn.Upsample)) or padding not in (0, (0, 0)):
                raise ValueError(f"{name} ({type(module).__name__}) cannot be made periodic in x")

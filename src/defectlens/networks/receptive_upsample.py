"""FCDD's receptive-field upsampling (Liznerski et al., ICLR 2021, Sec. 3 and Alg. 1).

A cell of a fully convolutional network's low-resolution output map sees a receptive field of
k x k input pixels centred on it. FCDD upsamples the map by a strided transposed convolution
with a fixed Gaussian kernel: every cell's value is spread over the pixels of its receptive
field, weighted by a Gaussian of standard deviation sigma about the field's centre.

    A' = ConvTranspose2d(A, G_sigma (K x K), stride s, padding (K - s) / 2)

K is the receptive field rounded up to K - s even, so that the Gaussian of cell i is centred
at pixel i * s + (s - 1) / 2 (the centre of the cell's s x s block, where bilinear
upsampling puts it too) and the output has exactly s * h x s * w pixels. The kernel is
normalised to sum to s^2, so a constant map stays (about) constant away from the borders;
the scale does not matter for any ranking metric. It is the zero-insertion upsampling of the
map followed by a Gaussian blur, i.e. a Gaussian-weighted splatting of each cell over its
receptive field. With ``make_padding_circular_in_x`` it wraps around in x.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def receptive_field(network: nn.Module, up_to: str | None = None) -> int:
    """Receptive field (pixels along one side) of the output of module ``up_to`` of a feed-forward
    ``network`` whose convolutions and max-pools are registered in forward order.

    Walks Conv2d / MaxPool2d layers in registration order: rf += (k_eff - 1) * jump, jump *=
    stride; it stops after the subtree of ``up_to`` (None: the whole network). Parallel
    projection shortcuts (modules named ``downsample``, as in torchvision's ResNets) are
    skipped: identity and 1 x 1 shortcuts do not widen the field.
    """
    field, jump, inside = 1, 1, False
    for name, module in network.named_modules():
        in_target = up_to is not None and (name == up_to or name.startswith(up_to + "."))
        if inside and not in_target:
            break
        inside = inside or in_target
        if "downsample" in name.split("."):
            continue
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            kernel, stride, dilation = (_first(getattr(module, key)) for key in ("kernel_size", "stride", "dilation"))
            field += (dilation * (kernel - 1)) * jump
            jump *= stride
    if up_to is not None and not inside:
        raise ValueError(f"the network has no module {up_to!r}")
    return field


def _first(value: int | tuple[int, ...]) -> int:
    return int(value[0] if isinstance(value, tuple) else value)


def gaussian_kernel_2d(size: int, sigma: float) -> Tensor:
    """(size, size) Gaussian of std ``sigma`` about the kernel centre, summing to 1."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    line = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = torch.outer(line, line)
    return (kernel / kernel.sum()).float()


class GaussianUpsample(nn.Module):
    """Receptive-field Gaussian upsampling of (N, 1, h, w) maps to (N, 1, s * h, s * w).

    Args:
        stride: input pixels per map cell, s.
        receptive_field: receptive field of a cell in pixels (the kernel is at least this wide).
        sigma: standard deviation of the Gaussian in pixels (FCDD: chosen from the receptive
            field; the PET-preform study: 8).
    """

    def __init__(self, stride: int, receptive_field: int, sigma: float) -> None:
        super().__init__()
        if stride < 1 or receptive_field < 1 or not sigma > 0:
            raise ValueError(f"need stride, receptive_field >= 1 and sigma > 0, got {stride}, {receptive_field}, {sigma}")
        size = max(receptive_field, stride)
        size += (size - stride) % 2  # K - s even: centred kernels and s * h outputs
        self.stride, self.kernel_size, self.sigma = stride, size, float(sigma)
        self.splat = nn.ConvTranspose2d(1, 1, size, stride=stride, padding=(size - stride) // 2, bias=False)
        with torch.no_grad():
            self.splat.weight.copy_(gaussian_kernel_2d(size, sigma).view(1, 1, size, size) * stride**2)
        self.splat.weight.requires_grad_(False)

    def forward(self, maps: Tensor) -> Tensor:
        """(N, 1, h, w) -> (N, 1, s * h, s * w)."""
        return self.splat(maps)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, kernel_size={self.kernel_size}, sigma={self.sigma}"


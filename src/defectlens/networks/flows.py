"""Conditional normalizing flows for CFlow-AD (Gudovskiy et al., WACV 2022), built with FrEIA.

``ConditionalFlow(channels)``: a stack of ``coupling_blocks`` FrEIA ``AllInOneBlock`` s, each an
affine coupling whose subnet (Linear(d, 2d) - ReLU - Linear(2d, out), CFlow's ``subnet_fc``)
sees the passive half of the vector concatenated with a condition vector; the scale is soft-
clamped, ``s = alpha * tanh(a / alpha)`` with alpha = ``clamp`` (CFlow: 1.9); a global affine
(SOFTPLUS) scaling and a random orthogonal "soft permutation" follow each coupling - exactly
CFlow's ``freia_cflow_head``. ``forward(x (E, C), condition (E, P)) -> (z (E, C), log|det J| (E,))``
and ``log_likelihood`` gives log p(x | condition) under a standard normal base density.

`positional_encoding_2d` is CFlow's 2-D sinusoidal encoding of feature-map positions (half the
channels encode x, half y); with ``periodic_x`` the x frequencies are integer harmonics of the
map width, so the encoding wraps around like a roll-out band.

FrEIA 0.2 (MIT, github.com/vislearn/FrEIA) is the library CFlow's code uses; it works with
torch 2.x. Its soft permutation draws a random rotation from numpy's global generator
(scipy ``special_ortho_group``); `ConditionalFlow` seeds that draw itself (``seed``) and leaves
numpy's global state as it found it, so the same seed builds the same flow.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

import FrEIA.framework as Ff
import FrEIA.modules as Fm

LOG_NORMAL_CONSTANT = -0.5 * math.log(2.0 * math.pi)
"""log of the standard normal density's constant, per dimension (CFlow's _GCONST_)."""


def subnet_fc(dims_in: int, dims_out: int) -> nn.Sequential:
    """CFlow's coupling subnet: Linear(d_in, 2 d_in) - ReLU - Linear(2 d_in, d_out)."""
    return nn.Sequential(nn.Linear(dims_in, 2 * dims_in), nn.ReLU(), nn.Linear(2 * dims_in, dims_out))


@contextlib.contextmanager
def _numpy_global_seed(seed: int) -> Iterator[None]:
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


class ConditionalFlow(nn.Module):
    """A conditional normalizing flow on C-dimensional vectors (one CFlow decoder).

    Args:
        channels: C, the dimension of the modelled vectors (an encoder layer's channels).
        condition_channels: P, the dimension of the condition (positional encoding; CFlow: 128).
        coupling_blocks: number of coupling blocks (CFlow: 8).
        clamp: soft clamping alpha of the log-scales (CFlow: 1.9).
        seed: seeds the random orthogonal permutations (weights follow torch's generator).
    """

    def __init__(self, channels: int, condition_channels: int = 128, coupling_blocks: int = 8, clamp: float = 1.9,
                 seed: int = 0) -> None:
        super().__init__()
        self.channels = int(channels)
        self.condition_channels = int(condition_channels)
        self.inn = Ff.SequenceINN(self.channels)
        with _numpy_global_seed(seed):
            for _ in range(int(coupling_blocks)):
                self.inn.append(
                    Fm.AllInOneBlock, cond=0, cond_shape=(self.condition_channels,), subnet_constructor=subnet_fc,
                    affine_clamping=float(clamp), global_affine_type="SOFTPLUS", permute_soft=True,
                )

    def forward(self, x: Tensor, condition: Tensor) -> tuple[Tensor, Tensor]:
        """x (E, C), condition (E, P) -> z (E, C) and log|det dz/dx| (E,)."""
        z, log_det = self.inn(x, c=[condition])
        return z, log_det

    def inverse(self, z: Tensor, condition: Tensor) -> Tensor:
        """z (E, C), condition (E, P) -> x (E, C)."""
        x, _ = self.inn(z, c=[condition], rev=True)
        return x

    def log_likelihood(self, x: Tensor, condition: Tensor) -> Tensor:
        """log p(x | condition) (E,), nats: C log N-constant - |z|^2 / 2 + log|det J| (CFlow's get_logp)."""
        z, log_det = self(x, condition)
        return self.channels * LOG_NORMAL_CONSTANT - 0.5 * z.pow(2).sum(dim=1) + log_det


def positional_encoding_2d(
    channels: int, height: int, width: int, periodic_x: bool = False, device: str | torch.device = "cpu",
) -> Tensor:
    """CFlow's 2-D sinusoidal positional encoding (P, H, W) of a feature map's positions.

    The first P/2 channels are sin/cos of the column index at frequencies 10000^(-2k/(P/2)),
    the last P/2 the same of the row index (``positionalencoding2d`` of CFlow's code). With
    ``periodic_x`` the column frequencies are 2 pi m / W for m = 1 .. P/4 (wraps around in x).
    P must be a multiple of 4.
    """
    if channels % 4:
        raise ValueError(f"positional encoding needs a multiple of 4 channels, got {channels}")
    half = channels // 2
    encoding = torch.zeros(channels, height, width, dtype=torch.float32)
    frequencies = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))  # (P/4,)
    columns = torch.arange(0.0, width).unsqueeze(1)  # (W, 1)
    rows = torch.arange(0.0, height).unsqueeze(1)
    column_frequencies = (2 * math.pi / width) * torch.arange(1.0, half // 2 + 1) if periodic_x else frequencies
    encoding[0:half:2] = torch.sin(columns * column_frequencies).T.unsqueeze(1).expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(columns * column_frequencies).T.unsqueeze(1).expand(-1, height, -1)
    encoding[half::2] = torch.sin(rows * frequencies).T.unsqueeze(2).expand(-1, -1, width)
    encoding[half + 1 :: 2] = torch.cos(rows * frequencies).T.unsqueeze(2).expand(-1, -1, width)
    return encoding.to(device)

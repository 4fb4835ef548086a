"""DSR's networks (Zavrtanik, Kristan, Skocaj, ECCV 2022: "DSR - A dual subspace re-projection
network for surface anomaly detection").

    VectorQuantizer        a codebook K of C-dim codes: nearest code per feature vector, the
                           straight-through gradient, EMA codebook updates while training
    GeneralVQVAE           the general object-appearance model (stage 1): encoder -> F_hi
                           (stride 4) -> encoder -> F_lo (stride 8) quantized by K_lo; Q_lo
                           upsampled, joined with F_hi, quantized by K_hi; the general
                           appearance decoder turns (Q_lo, Q_hi) back into an image
    SubspaceRestriction    the object-specific subspace: an encoder-decoder on a quantized
                           feature map whose output is re-quantized with the same (frozen) codebook
    ObjectDecoder          the object-specific appearance decoder (an hourglass, no skips)
    UNet                   the anomaly-detection module (on the two decoders' images) and the
                           upsampling module (on the images and the coarse mask)

Differences from the reference code, for a 2-core CPU and for roll-out bands: widths are
smaller (hidden 64, codes 64-dim, 1024 codes per codebook instead of 128 / 128 / 4096; U-Nets
16 and 8 base channels instead of 64), and every transposed convolution is a nearest-neighbour
upsampling followed by a 3x3 convolution, so `backbones.features.make_padding_circular_in_x`
can make every network periodic in x. Images are float32 RGB (N, 3, H, W) in [0, 1], H and W
multiples of 8 (`DSR_STRIDE`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DSR_STRIDE = 8
"""Input pixels per cell of the coarse features F_lo; inputs must be multiples of it."""


class VectorQuantizer(nn.Module):
    """A codebook of ``num_codes`` vectors of ``dim`` channels, updated by exponential moving
    averages (van den Oord et al. 2017, appendix; ``decay``) while the module is training.

    The codebook, its cluster sizes and sums are buffers (no optimizer touches them).
    """

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, commitment: float = 0.25, epsilon: float = 1e-5) -> None:
        super().__init__()
        self.num_codes, self.dim = int(num_codes), int(dim)
        self.decay, self.commitment, self.epsilon = float(decay), float(commitment), float(epsilon)
        codebook = torch.randn(self.num_codes, self.dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.zeros(self.num_codes))
        self.register_buffer("code_sum", codebook.clone())

    @staticmethod
    def _flat(z: Tensor) -> Tensor:
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])

    def distances(self, z: Tensor) -> Tensor:
        """Squared distances (N * h * w, K) of every feature vector of z (N, C, h, w) to every code."""
        flat = self._flat(z)
        return (flat.pow(2).sum(1, keepdim=True) + self.codebook.pow(2).sum(1) - 2.0 * flat @ self.codebook.t()).clamp_min(0)

    def indices(self, z: Tensor) -> Tensor:
        """Index (N, h, w) int64 of the nearest code of each feature vector."""
        return self.distances(z).argmin(dim=1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, indices: Tensor) -> Tensor:
        """Codes of indices (N, h, w) -> (N, C, h, w)."""
        return self.codebook[indices].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (N, C, h, w) -> (quantized with the straight-through gradient (N, C, h, w),
        indices (N, h, w), commitment loss ``commitment * |z - sg(q)|^2``)."""
        indices = self.indices(z)
        quantized = self.lookup(indices)
        if self.training:
            self._ema_update(z.detach(), indices)
        loss = self.commitment * F.mse_loss(z, quantized.detach())
        return z + (quantized - z).detach(), indices, loss

    @torch.no_grad()
    def _ema_update(self, z: Tensor, indices: Tensor) -> None:
        flat = self._flat(z)
        one_hot = F.one_hot(indices.flatten(), self.num_codes).to(flat.dtype)
        self.cluster_size.mul_(self.decay).add_(one_hot.sum(0), alpha=1 - self.decay)
        self.code_sum.mul_(self.decay).add_(one_hot.t() @ flat, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.num_codes * self.epsilon) * total
        self.codebook.copy_(self.code_sum / smoothed.unsqueeze(1))

    @torch.no_grad()
    def restart_dead_codes(self, z: Tensor, min_usage: float = 0.03) -> int:
        """Move codes whose EMA cluster size is below ``min_usage`` onto random feature vectors of
        z (a batch), so the codebook keeps covering the data (VQ-VAE practice; used in stage-1
        pretraining only). Returns how many codes moved."""
        dead = torch.nonzero(self.cluster_size < min_usage).flatten()
        if dead.numel() == 0:
            return 0
        flat = self._flat(z.detach())
        chosen = flat[torch.randint(flat.shape[0], (dead.numel(),), device=flat.device)]
        self.codebook[dead] = chosen
        self.code_sum[dead] = chosen
        self.cluster_size[dead] = 1.0
        return int(dead.numel())


class Residual(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), as VQ-VAE's residual layers."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.ReLU(),
                                   nn.Conv2d(hidden, channels, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def residual_stack(channels: int, hidden: int, layers: int) -> nn.Sequential:
    return nn.Sequential(*[Residual(channels, hidden) for _ in range(layers)], nn.ReLU())


def up_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """x2 nearest-neighbour upsampling and a 3x3 convolution (a transposed convolution's role)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_channels, out_channels, 3, padding=1))


class GeneralVQVAE(nn.Module):
    """DSR's discrete latent model: two encoders, two codebooks, the general appearance decoder.

    Args:
        hidden: channels of the encoders and the decoder.
        dim: channels of the codes.
        num_codes: codes per codebook (K_hi and K_lo have the same size).
        residual_layers: residual layers per stack.
    """

    def __init__(self, hidden: int = 64, dim: int = 64, num_codes: int = 1024, residual_layers: int = 2) -> None:
        super().__init__()
        self.hidden, self.dim, self.num_codes, self.residual_layers = hidden, dim, num_codes, residual_layers
        res = hidden // 2
        self.encoder_hi = nn.Sequential(
            nn.Conv2d(3, hidden // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), residual_stack(hidden, res, residual_layers))
        self.encoder_lo = nn.Sequential(
            nn.Conv2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), residual_stack(hidden, res, residual_layers))
        self.pre_quantize_lo = nn.Conv2d(hidden, dim, 1)
        self.quantizer_lo = VectorQuantizer(num_codes, dim)
        self.upsample_lo = up_conv(dim, dim)
        self.pre_quantize_hi = nn.Conv2d(hidden + dim, dim, 1)
        self.quantizer_hi = VectorQuantizer(num_codes, dim)
        self.decoder = nn.Sequential(
            nn.Conv2d(2 * dim, hidden, 3, padding=1), residual_stack(hidden, res, residual_layers),
            up_conv(hidden, hidden // 2), nn.ReLU(), up_conv(hidden // 2, 3))

    def config(self) -> dict[str, int]:
        return {"hidden": self.hidden, "dim": self.dim, "num_codes": self.num_codes, "residual_layers": self.residual_layers}

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images (N, 3, H, W) -> (encoder_hi output (N, hidden, H/4, W/4), F_lo (N, dim, H/8, W/8))."""
        hi = self.encoder_hi(x)
        return hi, self.pre_quantize_lo(self.encoder_lo(hi))

    def features_hi(self, encoded_hi: Tensor, quantized_lo: Tensor) -> Tensor:
        """F_hi (N, dim, H/4, W/4) from the encoder_hi output and (upsampled) Q_lo."""
        return self.pre_quantize_hi(torch.cat([encoded_hi, self.upsample_lo(quantized_lo)], dim=1))

    def join(self, quantized_lo: Tensor, quantized_hi: Tensor) -> Tensor:
        """(Q_lo, Q_hi) -> the decoders' input (N, 2 dim, H/4, W/4)."""
        return torch.cat([self.upsample_lo(quantized_lo), quantized_hi], dim=1)

    def decode(self, quantized_lo: Tensor, quantized_hi: Tensor) -> Tensor:
        """The general appearance decoder: (Q_lo, Q_hi) -> image (N, 3, H, W)."""
        return self.decoder(self.join(quantized_lo, quantized_hi))

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Images -> (F_lo, Q_lo, F_hi, Q_hi, commitment loss) (straight-through quantized)."""
        encoded_hi, z_lo = self.encode(x)
        q_lo, _, loss_lo = self.quantizer_lo(z_lo)
        z_hi = self.features_hi(encoded_hi, q_lo)
        q_hi, _, loss_hi = self.quantizer_hi(z_hi)
        return z_lo, q_lo, z_hi, q_hi, loss_lo + loss_hi

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Stage 1: images -> (reconstruction (N, 3, H, W), commitment loss)."""
        _, q_lo, _, q_hi, loss = self.quantize(x)
        return self.decode(q_lo, q_hi), loss


def conv_norm_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.InstanceNorm2d(out_channels), nn.ReLU()]


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(*conv_norm_relu(in_channels, out_channels), *conv_norm_relu(out_channels, out_channels))


class SubspaceRestriction(nn.Module):
    """Encoder-decoder (two poolings, no skips) from a quantized feature map (N, dim, h, w) to
    features of the same shape; the caller re-quantizes them with the general codebook."""

    def __init__(self, dim: int = 64, width: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(double_conv(dim, width), nn.MaxPool2d(2), double_conv(width, 2 * width), nn.MaxPool2d(2),
                                     double_conv(2 * width, 4 * width))
        self.decoder = nn.Sequential(up_conv(4 * width, 2 * width), nn.InstanceNorm2d(2 * width), nn.ReLU(),
                                     double_conv(2 * width, 2 * width), up_conv(2 * width, width), nn.InstanceNorm2d(width),
                                     nn.ReLU(), double_conv(width, width), nn.Conv2d(width, dim, 3, padding=1))

    def forward(self, quantized: Tensor) -> Tensor:
        return self.decoder(self.encoder(quantized))


class ObjectDecoder(nn.Module):
    """The object-specific appearance decoder: joined codes (N, 2 dim, H/4, W/4) -> image.

    An hourglass (down to stride 8 and back, no skip connections, as the reference's image
    reconstruction network), then the general decoder's layout up to full resolution.
    """

    def __init__(self, dim: int = 64, hidden: int = 64, residual_layers: int = 2) -> None:
        super().__init__()
        self.hourglass = nn.Sequential(double_conv(2 * dim, hidden), nn.MaxPool2d(2), double_conv(hidden, hidden),
                                       up_conv(hidden, hidden), nn.ReLU())
        self.decoder = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1), residual_stack(hidden, hidden // 2, residual_layers),
            up_conv(hidden, hidden // 2), nn.ReLU(), up_conv(hidden // 2, 3))

    def forward(self, joined: Tensor) -> Tensor:
        return self.decoder(self.hourglass(joined))


class UNet(nn.Module):
    """A U-Net: ``depth`` poolings, base ``width`` channels doubling (at most 4x), skip
    connections, a 3x3 output convolution to ``out_channels`` logits. Input sides must be
    multiples of 2^depth."""

    def __init__(self, in_channels: int, out_channels: int = 2, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        channels = [width * min(2**level, 4) for level in range(depth + 1)]
        self.down = nn.ModuleList([double_conv(in_channels, channels[0])]
                                  + [double_conv(channels[k - 1], channels[k]) for k in range(1, depth + 1)])
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList([nn.Sequential(up_conv(channels[k], channels[k - 1]), nn.InstanceNorm2d(channels[k - 1]),
                                               nn.ReLU()) for k in range(depth, 0, -1)])
        self.merge = nn.ModuleList([double_conv(2 * channels[k - 1], channels[k - 1]) for k in range(depth, 0, -1)])
        self.out = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for index, block in enumerate(self.down):
            x = block(x if index == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.out(x)


def init_normal(module: nn.Module) -> None:
    """The reference code's init of trained-from-scratch parts: conv weights ~ N(0, 0.02)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

"""SSIM autoencoder / SCAE (the student report's system; Bergmann et al., VISAPP 2019).

    network   the symmetric convolutional autoencoder of `networks.conv_autoencoder`, trained
              from scratch (at the model-input size: 256 px for transistor), 1 x 1 x d code
    train     loss = (1 - w) * MSE(x_hat, x) + w * (1 - mean SSIM(x_hat, x)), w = 0.5
              (kornia's SSIM: 11 x 11 Gaussian window, sigma 1.5, per channel)
    score     map = squared residual (mean over RGB) or, with ``anomaly_map="ssim"``,
              1 - SSIM (mean over RGB), (N, H, W);
              image score = max of the post-processed map, or ``image_score="mean"``: the
              mean of the (pooled) map, via the protocol's ``image_scores`` hook

Budget: 500 steps of 8 images by default (~0.3 s a step at 256 px on one free core: ~2.5 min;
Bergmann et al. train far longer, so the network is undertrained on a 2-core CPU).
Optimizer: Adam, lr 1e-3 (Bergmann et al.: 2e-4; for the short CPU budget: on transistor, 18
images, the loss after 140 steps is 0.213 at 1e-3 and 0.224 at 2e-4, which sits on the initial
plateau of 0.30 for ~50 steps;
SGD with Nesterov momentum, the PET study's default, is ``optimizer="sgd_nesterov"``).
Circular padding: every padded convolution wraps around in x, and the SSIM windows of the
loss and the map wrap around too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import kornia
import torch
import torch.nn.functional as F
from torch import nn

from defectlens.backbones.efficientnet_lite import pad_circular_x
from defectlens.backbones.features import make_padding_circular_in_x
from defectlens.errors import ConfigError
from defectlens.methods.trained import TrainedMethod
from defectlens.networks.conv_autoencoder import ConvAutoencoder

if TYPE_CHECKING:
    from defectlens.samples import Batch

ANOMALY_MAPS = ("residual", "ssim")
IMAGE_SCORES = ("max", "mean")


class SsimAutoencoder(TrainedMethod):
    """Convolutional autoencoder from scratch with an MSE + SSIM loss; map = residual or 1 - SSIM.

    Args:
        latent_dim: size of the 1 x 1 code.
        ssim_weight: w in (1 - w) * MSE + w * (1 - SSIM).
        ssim_window: side of SSIM's Gaussian window in pixels (odd).
        anomaly_map: "residual" (squared residual) or "ssim" (1 - SSIM).
        image_score: "max" of the map or its "mean".
    """

    name = "ssim_autoencoder"
    option_choices = {**TrainedMethod.option_choices, "anomaly_map": ANOMALY_MAPS, "image_score": IMAGE_SCORES}

    def __init__(
        self, latent_dim: int = 100, ssim_weight: float = 0.5, ssim_window: int = 11, anomaly_map: str = "residual",
        image_score: str = "max", max_steps: int = 500, optimizer: str = "adam", learning_rate: float = 1e-3,
        train_batch_size: int = 8, **training: Any,
    ) -> None:
        super().__init__(
            max_steps=max_steps, optimizer=optimizer, learning_rate=learning_rate, train_batch_size=train_batch_size,
            **training,
        )
        if anomaly_map not in ANOMALY_MAPS:
            raise ConfigError(f"anomaly_map must be one of {', '.join(ANOMALY_MAPS)}, got {anomaly_map!r}")
        if image_score not in IMAGE_SCORES:
            raise ConfigError(f"image_score must be one of {', '.join(IMAGE_SCORES)}, got {image_score!r}")
        if not 0.0 <= ssim_weight <= 1.0:
            raise ConfigError(f"ssim_weight must be in [0, 1], got {ssim_weight}")
        if ssim_window < 3 or ssim_window % 2 == 0:
            raise ConfigError(f"ssim_window must be odd and >= 3, got {ssim_window}")
        self.latent_dim = int(latent_dim)
        self.ssim_weight = float(ssim_weight)
        self.ssim_window = int(ssim_window)
        self.anomaly_map = anomaly_map
        self.image_score = image_score

    def build_networks(self) -> dict[str, nn.Module]:
        network = ConvAutoencoder(self.context.image_size, self.latent_dim).to(self.device)
        if self.context.circular_padding:
            make_padding_circular_in_x(network)
        return {"autoencoder": network}

    def ssim_map(self, reconstruction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel, per-channel SSIM (N, 3, H, W); the windows wrap around in x when circular."""
        if not self.context.circular_padding:
            return kornia.metrics.ssim(reconstruction, x, self.ssim_window)
        radius = self.ssim_window // 2

        def pad(images: torch.Tensor) -> torch.Tensor:
            return F.pad(pad_circular_x(images, radius, radius), (0, 0, radius, radius), mode="reflect")

        return kornia.metrics.ssim(pad(reconstruction), pad(x), self.ssim_window, padding="valid")

    def training_step(self, batch: "Batch") -> torch.Tensor:
        reconstruction = self.networks["autoencoder"](batch.x)
        mse = F.mse_loss(reconstruction, batch.x)
        dissimilarity = 1.0 - self.ssim_map(reconstruction, batch.x).mean()
        return (1.0 - self.ssim_weight) * mse + self.ssim_weight * dissimilarity

    @torch.no_grad()
    def patch_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Squared residual or 1 - SSIM (N, H, W), mean over the colour channels."""
        reconstruction = self.networks["autoencoder"](x)
        if self.anomaly_map == "ssim":
            return (1.0 - self.ssim_map(reconstruction, x)).mean(dim=1)
        return (reconstruction - x).pow(2).mean(dim=1)

    def image_scores(self, x: torch.Tensor, patch_scores: torch.Tensor) -> torch.Tensor | None:
        """The mean of the map with ``image_score="mean"``; None (the max of the map) otherwise."""
        return patch_scores.flatten(1).mean(dim=1) if self.image_score == "mean" else None

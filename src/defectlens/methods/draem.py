"""DRAEM (Zavrtanik, Kristan, Skocaj: "DRAEM - A discriminatively trained reconstruction
embedding for surface anomaly detection", ICCV 2021).

Training (normal images only, Sec. 3):
    1. simulate anomalies: a thresholded Perlin-noise mask filled with an augmented anomaly-
       source image at opacity beta ~ U(0, 0.8); half the images stay normal
       (`data.anomaly_source.draem_anomaly`; the source is a folder the user names, or offline
       procedural / scikit-image textures instead of the paper's DTD)
    2. the reconstructive sub-network maps the (possibly anomalous) image back to its normal
       version: L2 + SSIM loss (1 - SSIM, 11x11 window; kornia)
    3. the discriminative sub-network sees [reconstruction, input] and segments the simulated
       anomaly: focal loss (gamma 2; kornia.losses.focal_loss)
    loss = L2 + (1 - SSIM) + focal, both networks trained together (Adam, the focal loss
    reaches the reconstructive network through the reconstruction, as in the paper's code).
Inference: map = the discriminative network's anomaly-class probability (softmax);
image score = max of the map averaged over a 21x21 window (the paper's ``avg_pool2d``).

CPU defaults (deviations from the paper, which trains 700 epochs of batch 8 with widths 128 /
64 at lr 1e-4): widths 16 / 32 (``reconstructive_width``, ``discriminative_width``), training on
random ``train_crop`` x ``train_crop`` crops of the model input (the networks are fully
convolutional; inference sees the whole image), lr 5e-4 and a step budget; the paper's lr steps
(x0.2 at 80 % and 90 % of the steps) with ``lr_schedule="step"`` (the default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectlens.backbones.efficientnet_lite import pad_circular_x
from defectlens.data.anomaly_source import AnomalySource, draem_anomaly
from defectlens.errors import ConfigError
from defectlens.methods.trained import TrainedMethod
from defectlens.networks.draem import DiscriminativeSubNetwork, ReconstructiveSubNetwork, draem_init, make_circular_in_x
from defectlens.training import TrainingConfig

if TYPE_CHECKING:
    from defectlens.samples import Batch, FitData


class Draem(TrainedMethod):
    """DRAEM: reconstructive + discriminative sub-networks trained on simulated anomalies.

    Args:
        reconstructive_width: channels of the reconstructive network's first block (paper: 128).
        discriminative_width: channels of the discriminative U-Net's first block (paper: 64).
        anomaly_source: a folder of images (searched recursively, e.g. DTD) that fill the
            simulated anomalies; None = offline procedural and scikit-image textures.
        anomaly_probability: fraction of training images given a simulated anomaly (paper: 0.5).
        train_crop: side in pixels of the random crops trained on (None: the whole model input).
        ssim_window: SSIM window of the reconstruction loss (paper: 11).
        focal_gamma: focusing parameter of the focal loss (paper: 2).
        score_window: side of the averaging window whose maximum is the image score (paper: 21).
    """

    name = "draem"

    def __init__(
        self, reconstructive_width: int = 16, discriminative_width: int = 32, anomaly_source: str | None = None,
        anomaly_probability: float = 0.5, train_crop: int | None = 128, ssim_window: int = 11, focal_gamma: float = 2.0,
        score_window: int = 21, max_steps: int = 1000, max_minutes: float | None = None, learning_rate: float = 5e-4,
        lr_schedule: str = "step", train_batch_size: int = 8, **training: Any,
    ) -> None:
        super().__init__(max_steps=max_steps, max_minutes=max_minutes, learning_rate=learning_rate,
                         lr_schedule=lr_schedule, train_batch_size=train_batch_size, **training)
        self.reconstructive_width = int(reconstructive_width)
        self.discriminative_width = int(discriminative_width)
        self.anomaly_source = None if anomaly_source is None else str(anomaly_source)
        self.anomaly_probability = float(anomaly_probability)
        self.train_crop = None if train_crop is None else int(train_crop)
        self.ssim_window = int(ssim_window)
        self.focal_gamma = float(focal_gamma)
        self.score_window = int(score_window)
        if min(self.reconstructive_width, self.discriminative_width) < 1:
            raise ConfigError(f"draem: widths must be >= 1, got {reconstructive_width}, {discriminative_width}")
        if not 0.0 < self.anomaly_probability <= 1.0:
            raise ConfigError(f"draem: anomaly_probability must be in (0, 1], got {anomaly_probability}")
        if self.train_crop is not None and self.train_crop < 32:
            raise ConfigError(f"draem: train_crop must be >= 32 px or None, got {train_crop}")
        if self.ssim_window < 3 or self.ssim_window % 2 == 0 or self.score_window < 1 or self.score_window % 2 == 0:
            raise ConfigError(f"draem: ssim_window (>= 3) and score_window must be odd, got {ssim_window}, {score_window}")
        self._source: AnomalySource | None = None

    # ------------------------------------------------------------------ networks
    def build_networks(self) -> dict[str, nn.Module]:
        reconstructive = ReconstructiveSubNetwork(self.reconstructive_width)
        discriminative = DiscriminativeSubNetwork(self.discriminative_width)
        for network in (reconstructive, discriminative):
            draem_init(network)
            if self.context.circular_padding:
                make_circular_in_x(network)
        return {"reconstructive": reconstructive.to(self.device), "discriminative": discriminative.to(self.device)}

    def training_config(self, **changes: Any) -> TrainingConfig:
        """The paper's schedule: lr x 0.2 at 80 % and 90 % of the steps (``lr_schedule="step"``)."""
        return super().training_config(**{"lr_step_fractions": (0.8, 0.9), "lr_gamma": 0.2, **changes})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3, H, W) in [0, 1] -> (reconstruction (N, 3, H, W), logits (N, 2, H, W))."""
        reconstruction = self.networks["reconstructive"](x)
        logits = self.networks["discriminative"](torch.cat([reconstruction, x], dim=1))
        return reconstruction, logits

    # ------------------------------------------------------------------ training
    def before_training(self, data: "FitData") -> None:
        self._source = AnomalySource(self.anomaly_source)

    def simulate_anomalies(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3, H, W) -> (images with simulated anomalies (N, 3, H, W), masks (N, H, W) int64).

        One numpy generator per image, seeded from torch's generator (seeded by the training loop).
        """
        source = self._source or AnomalySource(self.anomaly_source)
        seeds = torch.randint(0, 2**62, (x.shape[0],)).tolist()
        images = x.detach().permute(0, 2, 3, 1).cpu().numpy()
        made = [draem_anomaly(image, np.random.default_rng(seed), source, self.anomaly_probability)
                for image, seed in zip(images, seeds)]
        anomalous = torch.from_numpy(np.stack([image for image, _ in made])).permute(0, 3, 1, 2)
        masks = torch.from_numpy(np.stack([mask for _, mask in made])).long()
        return anomalous.to(x.device, x.dtype).contiguous(), masks.to(x.device)

    def _random_crops(self, x: torch.Tensor) -> torch.Tensor:
        crop = self.train_crop
        height, width = x.shape[-2:]
        if crop is None or (crop >= height and crop >= width):
            return x
        crop_h, crop_w = min(crop, height), min(crop, width)
        tops = torch.randint(0, height - crop_h + 1, (x.shape[0],)).tolist()
        lefts = torch.randint(0, width - crop_w + 1, (x.shape[0],)).tolist()
        return torch.stack([image[:, t : t + crop_h, l : l + crop_w] for image, t, l in zip(x, tops, lefts)])

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three DRAEM losses of normal images x (N, 3, H, W) (anomalies simulated here)."""
        anomalous, masks = self.simulate_anomalies(x)
        reconstruction, logits = self.forward(anomalous)
        ssim = kornia.metrics.ssim(reconstruction, x, self.ssim_window, max_val=1.0)
        focal = kornia.losses.focal_loss(logits, masks, alpha=None, gamma=self.focal_gamma, reduction="none")
        return {"l2": F.mse_loss(reconstruction, x), "ssim": 1.0 - ssim.mean(), "focal": focal.sum(dim=1).mean()}

    def training_step(self, batch: "Batch") -> torch.Tensor:
        return sum(self.loss_terms(self._random_crops(batch.x)).values())

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def patch_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly-class probability per pixel (N, H, W)."""
        _, logits = self.forward(x)
        return torch.softmax(logits, dim=1)[:, 1].float()

    @torch.no_grad()
    def image_scores(self, x: torch.Tensor, patch_scores: torch.Tensor) -> torch.Tensor:
        """Max of the map averaged over score_window x score_window (zero padding; wraps in x for bands)."""
        radius = self.score_window // 2
        maps = patch_scores.unsqueeze(1).float()
        if self.context.circular_padding and radius <= maps.shape[-1]:
            maps = F.pad(pad_circular_x(maps, radius, radius), (0, 0, radius, radius))
        else:
            maps = F.pad(maps, (radius,) * 4)
        return F.avg_pool2d(maps, self.score_window, stride=1).amax(dim=(1, 2, 3))

    def fit_summary(self) -> dict[str, Any]:
        summary = super().fit_summary()
        if summary:
            summary["anomaly_source"] = (self._source or AnomalySource(self.anomaly_source)).describe()
        return summary

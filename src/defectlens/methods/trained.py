"""What every method that trains networks of its own shares (student-teacher, EfficientAD, ...).

A trained method consumes images (``input = "images"``: (N, 3, H, W) in [0, 1]) and is
calibrated on a held-out split of the training images (``calibration = "split"``: one
training run, never k retrainings). Its file reads like its paper:

    build_networks()        the networks, built from the method's options and its context
    trainable_modules()     what `training.train` optimizes (frozen parts are left out)
    training_step(batch)    one loss (the loop, optimizer, budgets and checks are shared)
    after_training(data)    e.g. normalization statistics from the held-out images
    patch_scores(x)         the anomaly map (N, h, w)

Training budgets (``max_steps``, ``max_minutes``), the optimizer and its schedule are options of
every trained method; each method sets defaults that fit a 2-core CPU. Networks are built under
a fixed seed and batches come in a seeded order, so the same seed gives the same weights.
State: every network's ``state_dict`` (prefixed by its name) plus ``extra_state()`` tensors.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from defectlens.errors import ConfigError
from defectlens.methods.base import AnomalyMethod, ProgressCallback
from defectlens.training import LR_SCHEDULES, OPTIMIZERS, TrainingConfig, TrainingSummary, seeded, train

if TYPE_CHECKING:
    from defectlens.samples import Batch, FitData


class TrainedMethod(AnomalyMethod):
    """Base of methods that train networks on normal images.

    Args:
        max_steps: optimizer steps of training (the step budget).
        max_minutes: optional wall-clock budget in minutes; training stops at whichever comes first.
        optimizer: "adam", "adamw", "sgd" or "sgd_nesterov".
        learning_rate: base learning rate.
        weight_decay: L2 penalty (decoupled for adamw).
        lr_schedule: "constant", "cosine" or "step" (x0.1 at 95 % of max_steps).
        train_batch_size: images per training step.
        validation_interval: steps between losses on the held-out images (0: only at the end).
        early_stopping_patience: stop after this many validations without improvement (best
            weights restored), or None.
        seed: seeds the networks' initialization, the batch order and the training noise.
    """

    input = "images"
    calibration = "split"
    option_choices = {"optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES}
    pretrained_networks: tuple[str, ...] = ()
    """Networks rebuilt from pretrained weights (a frozen teacher or encoder): not saved."""

    def __init__(
        self, max_steps: int = 1000, max_minutes: float | None = None, optimizer: str = "adam",
        learning_rate: float = 1e-3, weight_decay: float = 0.0, lr_schedule: str = "constant",
        train_batch_size: int = 8, validation_interval: int = 0, early_stopping_patience: int | None = None,
        seed: int = 0,
    ) -> None:
        self.max_steps = max_steps
        self.max_minutes = max_minutes
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.train_batch_size = int(train_batch_size)
        self.validation_interval = validation_interval
        self.early_stopping_patience = early_stopping_patience
        self.seed = seed
        self.training_config()  # validates the options now, not after the features are made
        self.training_summary: TrainingSummary | None = None
        self._built = False

    # ------------------------------------------------------------------ what a method supplies
    @abstractmethod
    def build_networks(self) -> dict[str, nn.Module]:
        """The method's networks by name (frozen pretrained parts included), on the context's device."""

    def trainable_modules(self) -> list[nn.Module]:
        """The networks `train` optimizes (default: every network with trainable parameters)."""
        return [module for module in self.networks.values() if any(p.requires_grad for p in module.parameters())]

    @abstractmethod
    def training_step(self, batch: "Batch") -> torch.Tensor:
        """One training loss (scalar tensor) of a batch of normal images."""

    def before_training(self, data: "FitData") -> None:
        """Hook before the first step (e.g. teacher feature statistics over the training images)."""

    def after_training(self, data: "FitData") -> None:
        """Hook after training (e.g. map normalization on the held-out images)."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Learned tensors that are not network weights (normalization statistics ...)."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore `extra_state`."""

    # ------------------------------------------------------------------ shared behaviour
    def training_config(self, **changes: Any) -> TrainingConfig:
        """The `TrainingConfig` of this method's options (validated), with ``changes``."""
        config = TrainingConfig(
            max_steps=self.max_steps, max_minutes=self.max_minutes, optimizer=self.optimizer,
            learning_rate=self.learning_rate, weight_decay=self.weight_decay, lr_schedule=self.lr_schedule,
            validation_interval=self.validation_interval, early_stopping_patience=self.early_stopping_patience,
            seed=self.seed, device=self.context.device,
        )
        return config.replace(**changes) if changes else config

    @property
    def device(self) -> torch.device:
        return torch.device(self.context.device)

    @property
    def networks(self) -> dict[str, nn.Module]:
        """The built networks (built on first use, under the method's seed)."""
        if not self._built:
            with seeded(self.seed, self.context.device):
                self._networks = self.build_networks()
            self._built = True
        return self._networks

    def training_batches(self, data: "FitData", batch_size: int | None = None) -> Any:
        """``batches(epoch)`` for `train`: seeded epochs of the fitting images, silent."""
        size = batch_size or self.train_batch_size

        def batches(epoch: int) -> Iterator["Batch"]:
            return data.epoch(epoch, batch_size=size, stage=None)

        return batches

    def held_out_loss(self, data: "FitData") -> float:
        """Mean training loss on the held-out images (validation for early stopping)."""
        losses = [float(self.training_step(batch)) for batch in data.held_out()]
        if not losses:
            raise ConfigError(f"{self.name}: early stopping needs held-out images (more than one training image)")
        return sum(losses) / len(losses)

    def fit_batches(self, data: "FitData", progress: ProgressCallback | None = None) -> None:
        """Build the networks, train them with the one loop, then run `after_training`."""
        modules = self.trainable_modules()
        self.before_training(data)
        validation = (lambda: self.held_out_loss(data)) if self.early_stopping_patience or self.validation_interval else None
        self.training_summary = self.train_modules(modules, self.training_step, data, progress, validation=validation)
        self.after_training(data)

    def train_modules(
        self, modules: list[nn.Module], step: Any, data: "FitData", progress: ProgressCallback | None,
        stage: str | None = None, config: TrainingConfig | None = None, **options: Any,
    ) -> TrainingSummary:
        """`training.train` over the parameters of ``modules`` (a stage of a method's training)."""
        parameters = [p for module in modules for p in module.parameters() if p.requires_grad]
        summary = train(
            parameters, step, self.training_batches(data), config or self.training_config(), modules=modules,
            progress=progress, stage=stage or f"training {self.name}", **options,
        )
        for module in self.networks.values():
            module.eval()
        return summary

    def fit_summary(self) -> dict[str, Any]:
        if self.training_summary is None:
            return {}
        summary = self.training_summary.to_dict()
        return {key: summary[key] for key in ("steps", "epochs", "seconds", "stop_reason", "final_loss", "loss_history",
                                              "validation_history", "best_validation_step", "restored_best")}

    def _saved_networks(self) -> dict[str, nn.Module]:
        return {name: module for name, module in self.networks.items() if name not in self.pretrained_networks}

    def state(self) -> dict[str, torch.Tensor]:
        """Network weights and extra tensors; 0-dim ones (a trained BatchNorm's
        ``num_batches_tracked``) as shape (1,), which model files can hash (``load_state_dict``
        takes them back)."""
        tensors = {
            f"{name}.{key}": value.reshape(1) if value.dim() == 0 else value
            for name, module in self._saved_networks().items() for key, value in module.state_dict().items()
        }
        extra = {f"extra.{key}": value.reshape(1) if value.dim() == 0 else value for key, value in self.extra_state().items()}
        return {**tensors, **extra}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, module in self._saved_networks().items():
            prefix = f"{name}."
            own = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
            try:
                module.load_state_dict(own, strict=True)
            except RuntimeError as error:
                raise ConfigError(f"{self.name}: the saved weights of {name!r} do not fit its network ({error})") from None
            module.eval()
        self.load_extra_state({key[6:]: value for key, value in tensors.items() if key.startswith("extra.")})

"""The method protocol: everything the detector may call on a method is declared here.

A method declares what it consumes (``input``): ``"features"`` - patch features (N, C, h, w)
of the shared frozen `FeatureExtractor` - or ``"images"`` - the (N, 3, H, W) model-input
tensor in [0, 1], for methods that run networks of their own. It returns patch (or pixel)
scores (N, h, w) at any resolution; pooling, upsampling, blurring, stitching tiles and
thresholds are shared steps (`postprocess`, `preprocess`, `calibration`).

    fit_batches(data, progress)      the one fit path; `data` is a `samples.FitData`:
                                     data.epoch(e) yields seeded (augmented after epoch 0)
                                     batches (x, image_index); data.joined() all of epoch 0;
                                     data.held_out() the held-out split ("split" calibration).
                                     Default: fit(x, image_index) on data.joined().
    patch_scores(x)                  (N, h, w) float32, higher = more anomalous
    image_scores(x, patch_scores)    optional (N,) scores; None = the max of the map
    calibration                      how held-out normal scores are made:
                                     "leave_one_out" - held_out_patch_scores(x, image_index)
                                     scores training images without their own contribution;
                                     "kfold" - the detector refits unfitted copies on folds;
                                     "split" - a held-out split of the training images is
                                     never fitted on (trained methods: never k retrainings)
    warm_start(source)               start the next fit from a fitted method (fine-tuning)
    fit_summary()                    JSON-safe summary of what the last fit did
    labelled_training_images()       defective images a supervised fit learned from (left
                                     out of evaluation); [] for methods that see only good ones
    state() / load_state()           learned state as named tensors
    config()                         hyper-parameters, read from the constructor signature
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Mapping, Sequence

import torch

from defectlens.errors import ConfigError
from defectlens.params import constructor_parameters, get_params

if TYPE_CHECKING:
    from defectlens.samples import FitData

MethodInput = Literal["features", "images"]
CalibrationKind = Literal["leave_one_out", "kfold", "split"]
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class MethodContext:
    """What the detector tells a method about the data it will see (`AnomalyMethod.bind`).

    Methods that build networks of their own read the backbone (a teacher, an encoder), the
    device, the model-input size and whether images are periodic in x from here.
    """

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] | None = None
    weights: str | None = None
    device: str = "cpu"
    image_size: tuple[int, int] = (256, 256)
    circular_padding: bool = False
    seed: int = 0


class AnomalyMethod(ABC):
    """Base class of every method; constructor arguments are its hyper-parameters.

    Subclasses set ``name``, ``input`` and ``calibration`` and implement ``patch_scores``,
    ``state`` and ``load_state``, plus ``fit`` (one pass over joined data) or their own
    ``fit_batches`` (streaming, training).
    """

    name: ClassVar[str]
    input: ClassVar[MethodInput] = "features"
    calibration: ClassVar[CalibrationKind] = "kfold"
    option_choices: ClassVar[Mapping[str, Sequence[str]]] = {}
    """Allowed values of string options (the CLI offers them as choices)."""
    renamed_options: ClassVar[Mapping[str, str | None]] = {}
    """Options of older model files: old name -> new name, or None for a dropped option."""

    context: MethodContext = MethodContext()

    def bind(self, context: MethodContext) -> None:
        """Receive the detector's context before fitting or loading state."""
        self.context = context

    def fit_batches(self, data: "FitData", progress: ProgressCallback | None = None) -> None:
        """Learn normality from the training images: by default ``fit`` on epoch 0, joined."""
        joined = data.joined()
        if progress:
            progress(f"fitting {self.name}", 0, 1)
        self.fit(joined.x, joined.image_index)
        if progress:
            progress(f"fitting {self.name}", 1, 1)

    def fit(self, x: torch.Tensor, image_index: torch.Tensor) -> None:
        """Learn from x (N, ...) of normal samples; ``image_index`` (N,) names each sample's
        training image (tiles of one image share it). Methods that override ``fit_batches``
        need not implement it."""
        raise ConfigError(f"{self.name} fits from a stream of batches only (fit_batches)")

    @abstractmethod
    def patch_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly score per patch or pixel: x (N, ...) -> (N, h, w) float32."""

    def image_scores(self, x: torch.Tensor, patch_scores: torch.Tensor) -> torch.Tensor | None:
        """Image scores (N,) from x and (pooled) patch scores (N, h, w), or None: the image
        score is then the max of the post-processed map."""
        return None

    def held_out_patch_scores(self, x: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """Patch scores (n, h, w) of training samples as if their images were unseen.

        Declared by methods with ``calibration = "leave_one_out"``.
        """
        raise ConfigError(f"{self.name} cannot score training images held out (calibration {self.calibration!r})")

    def warm_start(self, source: "AnomalyMethod") -> None:
        """Start the next fit from the fitted ``source`` (fine-tuning)."""
        raise ConfigError(f"{self.name} cannot start from another model (init)")

    def labelled_training_images(self) -> list[Path]:
        """Defective images whose labels the last fit used (supervised methods); evaluation
        leaves them out of the test set."""
        return []

    def fit_summary(self) -> dict[str, Any]:
        """JSON-safe summary of the last fit (epochs, training steps, losses ...)."""
        return {}

    @classmethod
    def parameters(cls) -> list[str]:
        """Names of the hyper-parameters (constructor arguments)."""
        return list(constructor_parameters(cls))

    def config(self) -> dict[str, Any]:
        """JSON-safe hyper-parameters; ``type(self)(**config())`` rebuilds an unfitted copy."""
        return get_params(self)

    @classmethod
    def upgrade_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Options read from an older model file, with renamed options renamed."""
        upgraded: dict[str, Any] = {}
        for key, value in options.items():
            new_key = cls.renamed_options.get(key, key)
            if new_key is not None:
                upgraded[new_key] = value
        return upgraded

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """Learned state as named tensors."""

    @abstractmethod
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore learned state saved by `state()` (after `bind`)."""

    def unfitted_copy(self) -> "AnomalyMethod":
        """A fresh instance with the same hyper-parameters and context."""
        copy = type(self)(**self.config())
        copy.bind(self.context)
        return copy

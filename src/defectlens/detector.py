"""Detector: the one object a user holds - fit on normal images, predict, save, load.

>>> det = Detector(method="patchcore", backbone="efficientnet_lite0", image_size=256)
>>> det.fit("data/transistor/train/good")
>>> pred = det.predict("part_0042.png")      # Prediction(score, anomaly_map, mask, is_anomalous)
>>> det.save("transistor.dlens"); det = Detector.load("transistor.dlens")
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from defectlens import __version__, postprocess
from defectlens.artifact import load_model, save_model
from defectlens.backbones import FeatureExtractor, get_backbone_spec
from defectlens.data.datasets import training_images
from defectlens.data.images import as_float_rgb, read_image
from defectlens.data.roi import Preprocess
from defectlens.errors import ConfigError, ImageReadError, ModelFileError, NotFittedError
from defectlens.methods import AnomalyMethod, build_method
from defectlens.thresholds import threshold_from_normal_scores

logger = logging.getLogger(__name__)

ImageInput = Union[str, Path, np.ndarray]
ProgressCallback = Callable[[str, int, int], None]
"""progress(stage, done, total): called as work advances (the CLI shows a progress bar)."""


@dataclass
class Prediction:
    """The verdict for one image.

    Attributes:
        score: image anomaly score (higher = more anomalous).
        anomaly_map: float32 (H, W) at the resolution of the image given (after ROI steps).
        mask: bool (H, W), anomaly_map > threshold.
        is_anomalous: score > threshold.
        threshold: the decision threshold used.
        source: the file path, or None for an array input.
    """

    score: float
    anomaly_map: np.ndarray
    mask: np.ndarray
    is_anomalous: bool
    threshold: float
    source: str | None = None


@dataclass
class FitInfo:
    """What fitting did: image count, timings (seconds) and the calibration scores' summary."""

    num_images: int = 0
    feature_seconds: float = 0.0
    method_seconds: float = 0.0
    calibration_seconds: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)


def _as_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(side) for side in image_size)
    if len(size) != 2 or min(size) < 16:
        raise ConfigError(f"image_size must be an int or (height, width) of at least 16 px, got {image_size!r}")
    return size  # type: ignore[return-value]


def expand_inputs(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    """A folder (or MVTec category root: its train/good) -> its images; a path or array -> [it]."""
    if isinstance(images, (str, Path)):
        path = Path(images)
        return list(training_images(path)) if path.is_dir() else [path]
    if isinstance(images, np.ndarray):
        return [images] if images.ndim in (2, 3) else list(images)
    return list(images)


def load_input(image: ImageInput, index: int = 0) -> tuple[np.ndarray, str | None]:
    """Decode one input to float32 RGB (H, W, 3); returns it with its path (None for arrays)."""
    if isinstance(image, (str, Path)):
        return read_image(image), str(image)
    return as_float_rgb(np.asarray(image), f"<array {index}>"), None


class Detector:
    """Anomaly detector: a backbone, a method, post-processing and a threshold.

    Args:
        method: "patchcore" or "padim" (see `defectlens.methods.METHODS`).
        backbone: feature backbone name (see `defectlens.backbones.available_backbones()`).
        image_size: side (or (height, width)) images are resized to before the backbone.
        layers: backbone layer names (default: the stride-8 and stride-16 stage ends).
        weights: local state-dict file for backbones without bundled weights (resnet18, ...).
        device: "cpu" (default) or "cuda".
        batch_size: images per backbone pass.
        blur_sigma: Gaussian blur of anomaly maps in model-input pixels (0 = none).
        target_fpr: fraction of normal images allowed above the threshold (default 0.01).
        calibration_images: at most this many training images are scored held-out to set the
            threshold (PatchCore: leave-one-image-out; other methods: k-fold).
        calibration_folds: folds of the k-fold calibration.
        preprocess: ROI steps (`defectlens.data.roi.Preprocess` or its dict) applied first.
        circular_padding: treat images as periodic in x (polar roll-out bands): backbone
            convolutions, map upsampling and blur wrap around the x border.
        seed: seeds every random step.
        **method_options: the method's hyper-parameters (e.g. coreset_ratio, covariance).
    """

    def __init__(
        self,
        method: str = "patchcore",
        backbone: str = "efficientnet_lite0",
        image_size: int | Sequence[int] = 256,
        layers: Sequence[str] | None = None,
        weights: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 16,
        blur_sigma: float = 4.0,
        target_fpr: float = 0.01,
        calibration_images: int = 40,
        calibration_folds: int = 5,
        preprocess: Preprocess | dict[str, Any] | None = None,
        circular_padding: bool = False,
        seed: int = 0,
        **method_options: Any,
    ) -> None:
        get_backbone_spec(backbone)  # fails early with the list of names
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for but no CUDA device is available")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.method_name = method
        self.backbone = backbone
        self.image_size = _as_size(image_size)
        self.layers = list(layers) if layers else None
        self.weights = str(weights) if weights else None
        self.device = device
        self.batch_size = batch_size
        self.blur_sigma = float(blur_sigma)
        self.target_fpr = float(target_fpr)
        self.calibration_images = int(calibration_images)
        self.calibration_folds = int(calibration_folds)
        self.preprocess = preprocess if isinstance(preprocess, Preprocess) else Preprocess.from_dict(preprocess)
        self.circular_padding = bool(circular_padding)
        self.seed = seed
        method_options.setdefault("seed", seed)
        self.method: AnomalyMethod = build_method(method, **method_options)
        self.threshold: float | None = None
        self.fit_info = FitInfo()
        self._extractor: FeatureExtractor | None = None

    # ------------------------------------------------------------------ features
    @property
    def extractor(self) -> FeatureExtractor:
        """The feature extractor, built on first use (weights load once)."""
        if self._extractor is None:
            self._extractor = FeatureExtractor(
                self.backbone, self.layers, self.weights, self.device, circular_padding=self.circular_padding
            )
        return self._extractor

    def _to_model_input(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Float32 RGB arrays (H, W, 3) -> (N, 3, *image_size) tensor, resized with antialiasing."""
        batch = []
        for image in images:
            tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0)
            if tuple(tensor.shape[-2:]) != self.image_size:
                tensor = F.interpolate(tensor, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
            batch.append(tensor)
        return torch.cat(batch).to(self.device)

    def _prepare(self, image: ImageInput, index: int = 0) -> tuple[np.ndarray, str | None]:
        pixels, source = load_input(image, index)
        if len(self.preprocess):
            pixels = self.preprocess.apply(pixels)
        return pixels, source

    def features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Patch features (N, C, h, w) of prepared images."""
        return self.extractor(self._to_model_input(images))

    def _iter_feature_batches(
        self, inputs: Sequence[ImageInput], progress: ProgressCallback | None, stage: str
    ) -> Iterator[torch.Tensor]:
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            prepared = [self._prepare(image, start + offset)[0] for offset, image in enumerate(chunk)]
            yield self.features(prepared)
            if progress:
                progress(stage, min(start + self.batch_size, len(inputs)), len(inputs))

    # ------------------------------------------------------------------ fit
    def fit(self, images: ImageInput | Iterable[ImageInput], progress: ProgressCallback | None = None) -> "Detector":
        """Learn normality from defect-free images and set the threshold; returns self.

        Args:
            images: a folder (an MVTec category root means its train/good), paths or arrays.
            progress: optional callback progress(stage, done, total).
        """
        inputs = expand_inputs(images)
        if not inputs:
            raise ConfigError("fit needs at least one training image")
        started = time.perf_counter()
        features = torch.cat(list(self._iter_feature_batches(inputs, progress, "features")))
        self.fit_info = FitInfo(num_images=len(inputs), feature_seconds=time.perf_counter() - started)
        started = time.perf_counter()
        if progress:
            progress(f"fitting {self.method_name}", 0, 1)
        self.method.fit(features)
        if progress:
            progress(f"fitting {self.method_name}", 1, 1)
        self.fit_info.method_seconds = time.perf_counter() - started
        started = time.perf_counter()
        self._calibrate(features, progress)
        self.fit_info.calibration_seconds = time.perf_counter() - started
        return self

    def _calibration_indices(self, num_images: int) -> torch.Tensor:
        count = min(num_images, self.calibration_images)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(num_images, generator=generator)[:count].sort().values

    def held_out_scores(self, features: torch.Tensor, progress: ProgressCallback | None = None) -> np.ndarray:
        """Image scores of training images as if unseen (leave-one-out or k-fold)."""
        num_images = features.shape[0]
        chosen = self._calibration_indices(num_images)
        patch_scores = self.method.held_out_patch_scores(features, chosen)
        if patch_scores is not None:
            return self._image_scores(features[chosen], patch_scores).numpy()
        folds = min(self.calibration_folds, num_images)
        fold_of_image = torch.arange(num_images) % folds
        scores = []
        for fold in range(folds):
            held_out = chosen[fold_of_image[chosen] == fold]
            if held_out.numel() == 0:
                continue
            fold_method = self.method.unfitted_copy()
            fold_method.fit(features[fold_of_image != fold])
            scores.append(self._image_scores(features[held_out], fold_method.patch_scores(features[held_out]), fold_method))
            if progress:
                progress("calibrating threshold", fold + 1, folds)
        return torch.cat(scores).numpy()

    def _calibrate(self, features: torch.Tensor, progress: ProgressCallback | None) -> None:
        if features.shape[0] < 2:
            logger.warning("one training image: the threshold is its own score (no held-out images)")
            normal_scores = self._image_scores(features, self.method.patch_scores(features)).numpy()
        else:
            normal_scores = self.held_out_scores(features, progress)
        self.threshold = threshold_from_normal_scores(normal_scores, self.target_fpr)
        self.fit_info.calibration = {
            "num_scores": int(normal_scores.size),
            "mean": float(normal_scores.mean()),
            "std": float(normal_scores.std()),
            "min": float(normal_scores.min()),
            "max": float(normal_scores.max()),
        }

    # ------------------------------------------------------------------ scoring
    def _image_scores(
        self, features: torch.Tensor, patch_scores: torch.Tensor, method: AnomalyMethod | None = None
    ) -> torch.Tensor:
        maps = postprocess.anomaly_maps(patch_scores, self.image_size, self.blur_sigma, self.circular_padding)
        return (method or self.method).image_scores(features, patch_scores, maps)

    def score_arrays(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Image scores (N,) and anomaly maps (each (H, W) at its image's size) of prepared images."""
        features = self.features(images)
        patch_scores = self.method.patch_scores(features)
        maps = postprocess.anomaly_maps(patch_scores, self.image_size, self.blur_sigma, self.circular_padding)
        scores = self.method.image_scores(features, patch_scores, maps)
        full_size = [
            postprocess.to_image_size(anomaly_map, image.shape[:2], self.circular_padding)
            for anomaly_map, image in zip(maps, images)
        ]
        return scores.numpy().astype(np.float64), full_size

    def _require_fitted(self) -> float:
        if self.threshold is None:
            raise NotFittedError("this detector is not fitted: call fit() or Detector.load() first")
        return self.threshold

    def _prediction(self, score: float, anomaly_map: np.ndarray, threshold: float, source: str | None) -> Prediction:
        return Prediction(
            score=float(score),
            anomaly_map=anomaly_map,
            mask=anomaly_map > threshold,
            is_anomalous=bool(score > threshold),
            threshold=threshold,
            source=source,
        )

    def predict(self, image: ImageInput, threshold: float | None = None) -> Prediction:
        """Verdict, score, map and mask for one image (path or array)."""
        return self.predict_batch([image], threshold)[0]

    def predict_batch(self, images: Sequence[ImageInput], threshold: float | None = None) -> list[Prediction]:
        """Predictions for several images at once (one backbone pass per `batch_size`).

        Raises ImageReadError on the first unreadable input; use `iter_predictions` to go on.
        """
        decision = self._require_fitted() if threshold is None else float(threshold)
        predictions: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            prepared = [self._prepare(image, start + i) for i, image in enumerate(images[start : start + self.batch_size])]
            scores, maps = self.score_arrays([pixels for pixels, _ in prepared])
            predictions.extend(
                self._prediction(score, anomaly_map, decision, source)
                for score, anomaly_map, (_, source) in zip(scores, maps, prepared)
            )
        return predictions

    def iter_predictions(
        self, images: Sequence[ImageInput], threshold: float | None = None
    ) -> Iterator[tuple[ImageInput, np.ndarray | None, Prediction | ImageReadError]]:
        """Predict many inputs, going on past bad ones.

        Yields (input, prepared image or None, Prediction or the ImageReadError) in input
        order; readable images are scored `batch_size` at a time.
        """
        decision = self._require_fitted() if threshold is None else float(threshold)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            prepared: list[tuple[np.ndarray, str | None] | ImageReadError] = []
            for offset, image in enumerate(chunk):
                try:
                    prepared.append(self._prepare(image, start + offset))
                except ImageReadError as error:
                    prepared.append(error)
            readable = [item for item in prepared if not isinstance(item, ImageReadError)]
            scores, maps = self.score_arrays([pixels for pixels, _ in readable]) if readable else ([], [])
            results = iter(zip(scores, maps))
            for image, item in zip(chunk, prepared):
                if isinstance(item, ImageReadError):
                    yield image, None, item
                    continue
                score, anomaly_map = next(results)
                yield image, item[0], self._prediction(score, anomaly_map, decision, item[1])

    # ------------------------------------------------------------------ files
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this detector, JSON-safe."""
        spec = get_backbone_spec(self.backbone)
        return {
            "method": self.method_name,
            "method_options": self.method.config(),
            "backbone": self.backbone,
            "layers": [layer.name for layer in self.extractor.layers] if self._extractor else self.layers,
            "weights": self.weights,
            "weights_sha256": _file_sha256(self.weights) if self.weights else None,
            "preprocessing": {
                "image_size": list(self.image_size),
                "resize": "bilinear-antialias",
                "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
                "roi": self.preprocess.to_dict(),
                "circular_padding": self.circular_padding,
            },
            "postprocessing": {"blur_sigma": self.blur_sigma},
            "batch_size": self.batch_size,
            "target_fpr": self.target_fpr,
            "calibration_images": self.calibration_images,
            "calibration_folds": self.calibration_folds,
            "seed": self.seed,
        }

    def save(self, path: str | Path) -> Path:
        """Write the fitted detector to one file (safetensors tensors + JSON metadata)."""
        threshold = self._require_fitted()
        metadata = {
            **self.config(),
            "threshold": threshold,
            "fit": {
                "num_images": self.fit_info.num_images,
                "feature_seconds": self.fit_info.feature_seconds,
                "method_seconds": self.fit_info.method_seconds,
                "calibration_seconds": self.fit_info.calibration_seconds,
                "calibration_scores": self.fit_info.calibration,
            },
        }
        tensors = {f"method.{name}": tensor for name, tensor in self.method.state().items()}
        return save_model(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Detector":
        """Read a model file written by `save`; ModelFileError if it is damaged or foreign."""
        tensors, metadata = load_model(path)
        try:
            weights = metadata.get("weights")
            if weights and metadata.get("weights_sha256") and Path(weights).is_file():
                if _file_sha256(weights) != metadata["weights_sha256"]:
                    raise ModelFileError(f"{path}: backbone weights {weights} changed since the model was fitted")
            detector = cls(
                method=metadata["method"],
                backbone=metadata["backbone"],
                image_size=metadata["preprocessing"]["image_size"],
                layers=metadata.get("layers"),
                weights=weights,
                device=device,
                batch_size=metadata.get("batch_size", 16),
                blur_sigma=metadata["postprocessing"]["blur_sigma"],
                target_fpr=metadata.get("target_fpr", 0.01),
                calibration_images=metadata.get("calibration_images", 40),
                calibration_folds=metadata.get("calibration_folds", 5),
                preprocess=metadata["preprocessing"].get("roi"),
                circular_padding=metadata["preprocessing"].get("circular_padding", False),
                **metadata["method_options"],
            )
            detector.method.load_state(
                {name.removeprefix("method."): tensor for name, tensor in tensors.items() if name.startswith("method.")}
            )
            detector.threshold = float(metadata["threshold"])
        except (KeyError, TypeError, ValueError) as error:
            raise ModelFileError(f"{path}: model metadata is incomplete or invalid ({error!r})") from None
        fit = metadata.get("fit", {})
        detector.fit_info = FitInfo(
            num_images=fit.get("num_images", 0),
            feature_seconds=fit.get("feature_seconds", 0.0),
            method_seconds=fit.get("method_seconds", 0.0),
            calibration_seconds=fit.get("calibration_seconds", 0.0),
            calibration=fit.get("calibration_scores", {}),
        )
        detector.metadata = metadata
        return detector


def _file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

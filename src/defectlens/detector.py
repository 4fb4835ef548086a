"""Detector: the one object a user holds - fit on normal images, predict, save, load.

>>> det = Detector(method="patchcore", backbone="efficientnet_lite0", image_size=256)
>>> det.fit("data/transistor/train/good")
>>> pred = det.predict("part_0042.png")      # Prediction(score, anomaly_map, mask, is_anomalous, image)
>>> det.save("transistor.dlens"); det = Detector.load("transistor.dlens")

It only orchestrates: inputs (`inputs`), ROI + resize + tiling (`preprocess`), the epoch /
batch stream (`samples`), the method (`methods`), the one map chain (`postprocess`),
thresholds (`calibration`) and the model file (`artifact`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from defectlens import artifact
from defectlens.backbones import FeatureExtractor, get_backbone_spec
from defectlens.calibration import Calibrator, image_scores, score_summary, threshold_f1_optimal, threshold_from_normal_scores
from defectlens.data.roi import Preprocess
from defectlens.data.transforms import AugmentationPipeline
from defectlens.errors import ConfigError, ImageReadError, ModelFileError, NotFittedError
from defectlens.hashing import file_sha256
from defectlens.inputs import ImageInput, expand_inputs
from defectlens.methods import AnomalyMethod, MethodContext, build_method, method_class
from defectlens.params import constructor_parameters
from defectlens.postprocess import MapChain
from defectlens.preprocess import InputPreparation, ScoredImage
from defectlens.results import FitInfo, Prediction
from defectlens.samples import FitData, ProgressCallback, batched

logger = logging.getLogger(__name__)
_NOT_SAVED = ("method", "device")  # the method is saved by name; the device is the loader's choice


class Detector:
    """Anomaly detector: a backbone, a method, post-processing and a threshold.

    Args:
        method: a name of `defectlens.methods.METHODS` ("patchcore", "sequential_patchcore", "padim").
        backbone: pretrained backbone (`defectlens.backbones.available_backbones()`).
        image_size: side (or (height, width)) images are resized to before the model.
        layers: backbone layer names (default: the stride-8 and stride-16 stage ends).
        weights: local state-dict file for backbones without bundled weights (resnet18, ...).
        device: "cpu" or "cuda".
        batch_size: model inputs per backbone / method pass.
        blur_sigma: Gaussian blur of anomaly maps in model-input pixels (0 = none).
        target_fpr: fraction of normal images allowed above the threshold.
        calibration_images: at most this many training images are scored held-out to set the
            threshold (leave-one-image-out or k-fold, as the method declares).
        calibration_folds: folds of the k-fold calibration.
        calibration_split: fraction of the training images held out (never fitted on) to set
            the threshold of methods whose calibration is "split" (trained methods).
        preprocess: ROI steps (`defectlens.data.roi.Preprocess` or its dict) applied first.
        circular_padding: treat images as periodic in x (polar roll-out bands).
        seed: seeds every random step (the method's too, unless given there).
        pool_size: average pooling of patch scores (kernel, in cells) before upsampling; 1 = none.
        tile_size: cut each prepared image into overlapping tiles of this side at full
            resolution, one model input each; maps are stitched back at full resolution and the
            image score is the max of the stitched map. None: no tiling.
        tile_overlap: pixels shared by neighbouring tiles.
        augmentation: fit-time augmentation of epochs after the first (methods that take
            several epochs): a preset ("light", "autovi", "sequential") or a list of step dicts.
        **method_options: the method's hyper-parameters (e.g. coreset_ratio, covariance).
    """

    def __init__(
        self, method: str = "patchcore", backbone: str = "efficientnet_lite0", image_size: int | Sequence[int] = 256,
        layers: Sequence[str] | None = None, weights: str | Path | None = None, device: str = "cpu",
        batch_size: int = 16, blur_sigma: float = 4.0, target_fpr: float = 0.01, calibration_images: int = 40,
        calibration_folds: int = 5, calibration_split: float = 0.1, preprocess: Preprocess | dict[str, Any] | None = None,
        circular_padding: bool = False, seed: int = 0, pool_size: int = 1, tile_size: int | None = None,
        tile_overlap: int = 32, augmentation: str | Sequence[dict[str, Any]] | None = None, **method_options: Any,
    ) -> None:
        spec = get_backbone_spec(backbone)  # fails early with the list of names
        _check_options(device, batch_size, pool_size, tile_size, tile_overlap, circular_padding, calibration_split)
        self.method_name, self.backbone, self.device = method, backbone, device
        self.image_size = _as_size(image_size)
        self.layers = list(layers) if layers else [layer.name for layer in spec.default_layers]
        self.weights = str(weights) if weights else None
        self.batch_size, self.blur_sigma, self.seed = int(batch_size), float(blur_sigma), seed
        self.target_fpr, self.calibration_images = float(target_fpr), int(calibration_images)
        self.calibration_folds, self.calibration_split = int(calibration_folds), float(calibration_split)
        self.preprocess = preprocess if isinstance(preprocess, Preprocess) else Preprocess.from_dict(preprocess)
        self.circular_padding, self.pool_size = bool(circular_padding), int(pool_size)
        self.tile_size = int(tile_size) if tile_size is not None else None
        self.tile_overlap = int(tile_overlap)
        self._augment = AugmentationPipeline.from_config(augmentation) if augmentation else None
        self.augmentation = self._augment.to_config() if self._augment else None
        if "seed" in method_class(method).parameters():
            method_options.setdefault("seed", seed)
        self.method: AnomalyMethod = build_method(method, **method_options)
        self.method.bind(MethodContext(backbone, tuple(self.layers), self.weights, device, self.image_size, self.circular_padding, seed))
        if self.tile_size and self.method.config().get("reweight"):
            logger.warning("with tiling the image score is the max of the stitched map: reweighting is not applied")
        self.threshold: float | None = None
        self.fit_info = FitInfo()
        self.metadata: dict[str, Any] = {}
        self._extractor: FeatureExtractor | None = None

    # ------------------------------------------------------------------ inputs
    @property
    def preparation(self) -> InputPreparation:
        """ROI + resize + tiling, from the current settings."""
        return InputPreparation(self.preprocess, self.image_size, self.tile_size, self.tile_overlap, self.circular_padding, self.device)

    @property
    def chain(self) -> MapChain:
        """The map chain (pool -> upsample -> blur -> image score), from the current settings."""
        return MapChain(self.pool_size, self.image_size, self.blur_sigma, self.circular_padding, self.tile_size is None)

    @property
    def extractor(self) -> FeatureExtractor:
        """The frozen feature extractor, built on first use (weights load once)."""
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.backbone, self.layers, self.weights, self.device, circular_padding=self.circular_padding)
        return self._extractor

    def features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Patch features (N, C, h, w) of prepared images (or tiles)."""
        return self.extractor(self.preparation.to_tensor(images))

    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Model inputs -> what the method consumes: features, or the image tensor (N, 3, H, W)."""
        return self.features(images) if self.method.input == "features" else self.preparation.to_tensor(images)

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments (method name included, method options not: see method.config())."""
        return {name: getattr(self, "method_name" if name == "method" else name) for name in constructor_parameters(Detector)}

    # ------------------------------------------------------------------ fit
    def fit(
        self, images: ImageInput | Iterable[ImageInput], progress: ProgressCallback | None = None,
        init: "Detector | str | Path | None" = None,
    ) -> "Detector":
        """Learn normality from defect-free images and set the threshold; returns self.

        Args:
            images: a folder (an MVTec category root means its train/good), paths or arrays.
            progress: optional callback progress(stage, done, total).
            init: a fitted detector or model file whose state this fit starts from
                (fine-tuning, e.g. synthetic -> real), for methods that support it.
        """
        inputs = expand_inputs(images)
        if not inputs:
            raise ConfigError("fit needs at least one training image")
        if init is not None:
            source = init if isinstance(init, Detector) else Detector.load(init)
            check_same_features(self, source, "the initial model")
            self.method.warm_start(source.method)
        data = self._fit_data(inputs, progress)
        started = time.perf_counter()
        self.method.fit_batches(data, progress)
        elapsed = time.perf_counter() - started
        self.fit_info = FitInfo(len(inputs), data.encode_seconds, elapsed - data.encode_seconds, method=self.method.fit_summary())
        started = time.perf_counter()
        calibrator = Calibrator(self.chain, self.preparation, self.calibration_images, self.calibration_folds, self.seed)
        self._set_threshold(calibrator.held_out_scores(self.method, data, progress))
        self.fit_info.calibration_seconds = time.perf_counter() - started
        return self

    def _fit_data(self, inputs: Sequence[ImageInput], progress: ProgressCallback | None) -> FitData:
        held_out: list[int] = []
        if self.method.calibration == "split" and len(inputs) > 1:
            count = min(len(inputs) - 1, max(1, round(self.calibration_split * len(inputs))))
            held_out = np.random.default_rng([self.seed, 1]).permutation(len(inputs))[:count].tolist()
        fit_indices = [index for index in range(len(inputs)) if index not in set(held_out)]
        return FitData(inputs, self.preparation, self.encode, self.batch_size, self.seed, self._augment, fit_indices, sorted(held_out), progress)

    def calibrate(
        self, images: ImageInput | Iterable[ImageInput], progress: ProgressCallback | None = None,
        labels: Sequence[int] | None = None,
    ) -> "Detector":
        """Set the threshold from images NOT used for fitting (e.g. after `meld_detectors`).

        Without ``labels`` they are normal images and the threshold is their (1 - target FPR)
        quantile; with ``labels`` (0 good, 1 defective, one per image) it is the F1-optimal one.
        """
        inputs = expand_inputs(images)
        if not inputs:
            raise ConfigError("calibrate needs at least one image")
        started = time.perf_counter()
        data = FitData(inputs, self.preparation, self.encode, self.batch_size, self.seed, progress=progress)
        batches = data.images(torch.arange(len(inputs)))
        scores = image_scores(self.method, self.chain, self.preparation, ((b, self.method.patch_scores(b.x)) for b in batches))
        if labels is None:
            self._set_threshold(scores)
            self.fit_info.calibration["source"] = f"{len(inputs)} held-out normal images (calibrate)"
        else:
            if len(labels) != len(inputs):
                raise ConfigError(f"calibrate got {len(labels)} labels for {len(inputs)} images")
            self.threshold = threshold_f1_optimal(scores, np.asarray(labels))
            self.fit_info.calibration = {**score_summary(scores), "source": f"F1-optimal on {len(inputs)} labelled images"}
        self.fit_info.calibration_seconds = time.perf_counter() - started
        return self

    def _set_threshold(self, normal_scores: np.ndarray) -> None:
        self.threshold = threshold_from_normal_scores(normal_scores, self.target_fpr)
        self.fit_info.calibration = score_summary(normal_scores)

    # ------------------------------------------------------------------ predict
    def score_images(self, images: Sequence[np.ndarray]) -> list[ScoredImage]:
        """Scores and maps (each at its image's size) of prepared images, in order."""
        model_inputs = (item for index, pixels in enumerate(images) for item in self.preparation.split(pixels, index))
        scored = ((batch, self.method.patch_scores(batch.x)) for batch in batched(model_inputs, self.batch_size, self.encode))
        return list(self.preparation.untile(self.chain.apply(self.method, scored)))

    def _require_fitted(self) -> float:
        if self.threshold is None:
            raise NotFittedError("this detector is not fitted: call fit() or Detector.load() first")
        return self.threshold

    def predict(self, image: ImageInput, threshold: float | None = None) -> Prediction:
        """Verdict, score, map and mask for one image (path or array)."""
        return self.predict_batch([image], threshold)[0]

    def predict_batch(self, images: Sequence[ImageInput], threshold: float | None = None) -> list[Prediction]:
        """Predictions for several images (one model pass per `batch_size`).

        Raises ImageReadError on the first unreadable input; use `iter_predictions` to go on.
        """
        predictions = []
        for image, outcome in self.iter_predictions(images, threshold):
            if isinstance(outcome, ImageReadError):
                raise outcome
            predictions.append(outcome)
        return predictions

    def iter_predictions(
        self, images: Sequence[ImageInput], threshold: float | None = None
    ) -> Iterator[tuple[ImageInput, Prediction | ImageReadError]]:
        """Predict many inputs, going on past bad ones: yields (input, Prediction or the
        ImageReadError) in input order; readable images are scored `batch_size` at a time."""
        decision = self._require_fitted() if threshold is None else float(threshold)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            prepared: list[tuple[np.ndarray, str | None] | ImageReadError] = []
            for offset, image in enumerate(chunk):
                try:
                    prepared.append(self.preparation.prepare(image, start + offset))
                except ImageReadError as error:
                    prepared.append(error)
            readable = [item for item in prepared if not isinstance(item, ImageReadError)]
            results = iter(self.score_images([pixels for pixels, _ in readable]))
            for image, item in zip(chunk, prepared):
                if isinstance(item, ImageReadError):
                    yield image, item
                    continue
                result = next(results)
                assert result.anomaly_map is not None
                yield image, Prediction(
                    result.score, result.anomaly_map, result.anomaly_map > decision, bool(result.score > decision),
                    decision, item[1], item[0],
                )

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write the fitted detector to one file (safetensors tensors + JSON metadata)."""
        params = {name: _json_safe(value) for name, value in self.get_params().items() if name not in _NOT_SAVED}
        contents = artifact.DetectorFile(
            self.method_name, self.method.config(), params, self._require_fitted(),
            dataclasses.asdict(self.fit_info), self.method.state(), {},
        )
        spec = get_backbone_spec(self.backbone)
        return artifact.write_detector(path, contents, {"mean": list(spec.mean), "std": list(spec.std)})

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Detector":
        """Read a model file written by `save`; ModelFileError if it is damaged or foreign."""
        contents = artifact.read_detector(path)
        try:
            options = method_class(contents.method).upgrade_options(contents.method_options)
            options = {name: value for name, value in options.items() if name not in contents.params}  # e.g. seed
            detector = cls(method=contents.method, device=device, **contents.params, **options)
            detector.method.load_state(contents.method_state)
            detector.fit_info = FitInfo(**contents.fit)
        except (KeyError, TypeError, ValueError, ConfigError) as error:
            raise ModelFileError(f"{path}: model metadata is incomplete or invalid ({error})") from None
        detector.threshold = contents.threshold
        detector.metadata = contents.document
        return detector


def _check_options(
    device: str, batch_size: int, pool_size: int, tile_size: int | None, tile_overlap: int, circular_padding: bool,
    calibration_split: float,
) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but no CUDA device is available")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if int(pool_size) < 1:
        raise ConfigError(f"pool_size must be >= 1, got {pool_size}")
    if not 0.0 < float(calibration_split) < 1.0:
        raise ConfigError(f"calibration_split must be in (0, 1), got {calibration_split}")
    if tile_size is not None:
        if int(tile_size) < 16:
            raise ConfigError(f"tile_size must be at least 16 px, got {tile_size}")
        if not 0 <= int(tile_overlap) < int(tile_size):
            raise ConfigError(f"tile_overlap must be in [0, tile_size {tile_size}), got {tile_overlap}")
        if circular_padding:
            raise ConfigError("tiling and circular_padding cannot be combined (tiles break the x period)")


def _as_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(side) for side in image_size)
    if len(size) != 2 or min(size) < 16:
        raise ConfigError(f"image_size must be an int or (height, width) of at least 16 px, got {image_size!r}")
    return size  # type: ignore[return-value]


def _json_safe(value: Any) -> Any:
    if isinstance(value, Preprocess):
        return value.to_dict()
    if isinstance(value, tuple):
        return list(value)
    return value


def feature_signature(detector: Detector) -> dict[str, Any]:
    """What makes two detectors' patch features comparable."""
    weights = detector.weights
    if weights and Path(weights).is_file():
        weights = file_sha256(weights)
    return {"backbone": detector.backbone, "layers": detector.layers, "image_size": list(detector.image_size), "weights": weights}


def check_same_features(detector: Detector, other: Detector, what: str) -> None:
    """ConfigError naming what differs when ``other``'s features are not ``detector``'s."""
    mine, theirs = feature_signature(detector), feature_signature(other)
    different = [f"{key} {theirs[key]!r} (not {mine[key]!r})" for key in mine if mine[key] != theirs[key]]
    if different:
        raise ConfigError(f"{what} has other features: {', '.join(different)}")

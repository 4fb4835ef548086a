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
from defectlens.calibration import CalibratedThresholds, Calibrator, NormalScoreModel, image_scores, score_summary, threshold_f1_optimal
from defectlens.data.roi import Preprocess
from defectlens.data.transforms import AugmentationPipeline
from defectlens.errors import ConfigError, ImageReadError, ModelFileError, NotFittedError
from defectlens.inputs import ImageInput, expand_inputs
from defectlens.methods import AnomalyMethod, MethodContext, build_method, method_class
from defectlens.params import constructor_parameters
from defectlens.postprocess import MapChain
from defectlens.preprocess import InputPreparation, ScoredImage
from defectlens.results import FitInfo, Prediction
from defectlens.rules import InspectionRules
from defectlens.samples import FitData, ProgressCallback, batched
from defectlens.settings import as_aggregation, as_size, check_same_features, check_settings, json_safe
from defectlens.threads import set_threads
from defectlens.verdicts import NOT_OK, judge

logger = logging.getLogger(__name__)
_NOT_SAVED = ("method", "device", "threads")  # the method is saved by name; device and threads are the loader's choice


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
        target_fpr: fraction of good parts allowed above the NOT OK threshold.
        review_fpr: with it (> target_fpr), a second, lower threshold: scores between the two
            are REVIEW (OK below it); None: one threshold, OK / NOT OK.
        threshold_model: how thresholds come from held-out normal scores: "tail" (conformal,
            extrapolated by a generalized Pareto tail below what the images support),
            "conformal", or "quantile" (defectlens 0.1's rule).
        calibration_images: at most this many training images are scored held-out to set the
            threshold (leave-one-image-out or k-fold, as the method declares); None: all.
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
        rules: inspection rules (`defectlens.rules.InspectionRules` or its dict): care and
            don't-care regions, minimum defect area, maximum defect count, per-zone thresholds.
        threads: CPU threads to compute with, set process-wide (``defectlens.threads``):
            N, "auto" (the cores not already busy) or None (leave torch's setting). Results
            do not depend on it.
        feature_aggregation: neighbourhood (cells) averaged into each patch feature: 3 (PatchCore's
            local aggregation) or 1 (none, as the PaDiM paper; better for tiny defects).
        **method_options: the method's hyper-parameters (e.g. coreset_ratio, covariance).
    """

    def __init__(
        self, method: str = "patchcore", backbone: str = "efficientnet_lite0", image_size: int | Sequence[int] = 256,
        layers: Sequence[str] | None = None, weights: str | Path | None = None, device: str = "cpu",
        batch_size: int = 16, blur_sigma: float = 4.0, target_fpr: float = 0.01, review_fpr: float | None = None,
        threshold_model: str = "tail", calibration_images: int | None = None, calibration_folds: int = 5,
        calibration_split: float = 0.1, preprocess: Preprocess | dict[str, Any] | None = None,
        circular_padding: bool = False, seed: int = 0, pool_size: int = 1, tile_size: int | None = None,
        tile_overlap: int = 32, augmentation: str | Sequence[dict[str, Any]] | None = None,
        rules: InspectionRules | dict[str, Any] | None = None, threads: int | str | None = None,
        feature_aggregation: int = 3, **method_options: Any,
    ) -> None:
        spec = get_backbone_spec(backbone)  # fails early with the list of names
        check_settings(device, batch_size, pool_size, tile_size, tile_overlap, circular_padding, calibration_split, target_fpr, review_fpr)
        self.method_name, self.backbone, self.device = method, backbone, device
        self.threads = threads
        set_threads(threads)
        self.image_size = as_size(image_size)
        self.layers = list(layers) if layers else [layer.name for layer in spec.default_layers]
        self.feature_aggregation = as_aggregation(feature_aggregation)
        self.weights = str(weights) if weights else None
        self.batch_size, self.blur_sigma, self.seed = int(batch_size), float(blur_sigma), seed
        self.target_fpr, self.review_fpr, self.threshold_model = float(target_fpr), review_fpr, threshold_model
        self.calibration_images = None if calibration_images is None else int(calibration_images)
        self.calibration_folds, self.calibration_split = int(calibration_folds), float(calibration_split)
        self.preprocess = preprocess if isinstance(preprocess, Preprocess) else Preprocess.from_dict(preprocess)
        self.circular_padding, self.pool_size = bool(circular_padding), int(pool_size)
        self.tile_size = int(tile_size) if tile_size is not None else None
        self.tile_overlap = int(tile_overlap)
        self._augment = AugmentationPipeline.from_config(augmentation) if augmentation else None
        self.augmentation = self._augment.to_config() if self._augment else None
        self.rules = InspectionRules.from_dict(rules)
        if "seed" in method_class(method).parameters():
            method_options.setdefault("seed", seed)
        self.method: AnomalyMethod = build_method(method, **method_options)
        self.method.bind(MethodContext(backbone, tuple(self.layers), self.weights, device, self.image_size, self.circular_padding, seed))
        if self.tile_size and self.method.config().get("reweight"):
            logger.warning("with tiling the image score is the max of the stitched map: reweighting is not applied")
        self.threshold: float | None = None
        self.review_threshold: float | None = None
        self.normal_scores: NormalScoreModel | None = None
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
            self._extractor = FeatureExtractor(self.backbone, self.layers, self.weights, self.device,
                                               circular_padding=self.circular_padding, aggregation=self.feature_aggregation)
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
        init: "Detector | str | Path | None" = None, validation: ImageInput | Iterable[ImageInput] | None = None,
    ) -> "Detector":
        """Learn normality from defect-free images and set the thresholds; returns self.

        Args:
            images: a folder (an MVTec category root means its train/good), paths or arrays.
            progress: optional callback progress(stage, done, total).
            init: a fitted detector or model file whose state this fit starts from
                (fine-tuning, e.g. synthetic -> real), for methods that support it.
            validation: good images never fitted on, scored plainly and added to the held-out
                calibration scores (default: ``validation/good`` of a category root, as MVTec
                LOCO ships it).
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
        scores = calibrator.held_out_scores(self.method, data, progress)
        extra = _validation_inputs(images, validation)
        if extra:
            scores = np.concatenate([scores, self._plain_scores(extra, progress)])
        self._set_thresholds(scores, held_out=len(scores) - len(extra), validation=len(extra))
        self.fit_info.calibration_seconds = time.perf_counter() - started
        return self

    def _fit_data(self, inputs: Sequence[ImageInput], progress: ProgressCallback | None) -> FitData:
        held_out: list[int] = []
        if self.method.calibration == "split" and len(inputs) > 1:
            count = min(len(inputs) - 1, max(1, round(self.calibration_split * len(inputs))))
            held_out = np.random.default_rng([self.seed, 1]).permutation(len(inputs))[:count].tolist()
        fit_indices = [index for index in range(len(inputs)) if index not in set(held_out)]
        return FitData(inputs, self.preparation, self.encode, self.batch_size, self.seed, self._augment, fit_indices, sorted(held_out), progress)

    def _plain_scores(self, inputs: Sequence[ImageInput], progress: ProgressCallback | None) -> np.ndarray:
        data = FitData(inputs, self.preparation, self.encode, self.batch_size, self.seed, progress=progress)
        batches = data.images(torch.arange(len(inputs)), "scoring validation images")
        return image_scores(self.method, self.chain, self.preparation, ((b, self.method.patch_scores(b.x)) for b in batches))

    def calibrate(
        self, images: ImageInput | Iterable[ImageInput], progress: ProgressCallback | None = None,
        labels: Sequence[int] | None = None,
    ) -> "Detector":
        """Set the thresholds from images NOT used for fitting (after `meld_detectors`, or to
        recalibrate with new good images). Without ``labels`` they are good images; with
        ``labels`` (0 good, 1 defective, one per image) the threshold is the F1-optimal one."""
        inputs = expand_inputs(images)
        if not inputs:
            raise ConfigError("calibrate needs at least one image")
        started = time.perf_counter()
        scores = self._plain_scores(inputs, progress)
        if labels is None:
            self._set_thresholds(scores, held_out=0, validation=len(inputs))
            self.fit_info.calibration["source"] = f"{len(inputs)} held-out normal images (calibrate)"
        else:
            if len(labels) != len(inputs):
                raise ConfigError(f"calibrate got {len(labels)} labels for {len(inputs)} images")
            self.threshold, self.review_threshold = threshold_f1_optimal(scores, np.asarray(labels)), None
            self.fit_info.calibration = {**score_summary(scores), "source": f"F1-optimal on {len(inputs)} labelled images"}
        self.fit_info.calibration_seconds = time.perf_counter() - started
        return self

    def _set_thresholds(self, normal_scores: np.ndarray, held_out: int, validation: int) -> None:
        thresholds = CalibratedThresholds.from_scores(normal_scores, self.target_fpr, self.review_fpr, self.threshold_model)
        self.threshold = thresholds.not_ok.threshold
        self.review_threshold = None if thresholds.review is None else thresholds.review.threshold
        self.normal_scores = thresholds.normal
        self.fit_info.calibration = {**thresholds.summary(), "held_out_training_images": held_out, "validation_images": validation}

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
        if isinstance(image, (list, tuple)):
            raise ConfigError(f"predict takes one image (a path or an array), got a {type(image).__name__}: use predict_batch")
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
                yield image, self._prediction(next(results), decision, threshold is None, *item)

    def _prediction(
        self, result: ScoredImage, decision: float, own_review: bool, image: np.ndarray, source: str | None
    ) -> Prediction:
        assert result.anomaly_map is not None
        review = self.review_threshold if own_review else None
        judged = judge(result.score, result.anomaly_map, decision, review, self.rules)
        p_value = None if self.normal_scores is None else self.normal_scores.p_value(judged.score)
        z_score = None if self.normal_scores is None else self.normal_scores.z_score(judged.score)
        return Prediction(
            judged.score, result.anomaly_map, judged.mask, judged.verdict == NOT_OK, decision, source, image,
            judged.verdict, review, p_value, z_score, judged.reasons, judged.defects,
        )

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write the fitted detector to one file (safetensors tensors + JSON metadata)."""
        params = {name: json_safe(value) for name, value in self.get_params().items() if name not in _NOT_SAVED}
        contents = artifact.DetectorFile(
            self.method_name, self.method.config(), params, self._require_fitted(), dataclasses.asdict(self.fit_info),
            self.method.state(), {}, self.review_threshold, None if self.normal_scores is None else self.normal_scores.to_dict(),
        )
        spec = get_backbone_spec(self.backbone)
        return artifact.write_detector(path, contents, {"mean": list(spec.mean), "std": list(spec.std)})

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", threads: int | str | None = None) -> "Detector":
        """Read a model file written by `save`; ModelFileError if it is damaged or foreign."""
        contents = artifact.read_detector(path)
        try:
            options = method_class(contents.method).upgrade_options(contents.method_options)
            options = {name: value for name, value in options.items() if name not in contents.params}  # e.g. seed
            detector = cls(method=contents.method, device=device, threads=threads, **contents.params, **options)
            detector.method.load_state(contents.method_state)
            detector.fit_info = FitInfo(**contents.fit)
        except (KeyError, TypeError, ValueError, ConfigError) as error:
            raise ModelFileError(f"{path}: model metadata is incomplete or invalid ({error})") from None
        detector.threshold, detector.review_threshold = contents.threshold, contents.review_threshold
        if contents.normal_scores is not None:
            detector.normal_scores = NormalScoreModel.from_dict(contents.normal_scores)
        detector.metadata = contents.document
        return detector


def _validation_inputs(images: Any, validation: ImageInput | Iterable[ImageInput] | None) -> list[ImageInput]:
    """The validation images given, or ``validation/good`` beside a category root's train/."""
    if validation is not None:
        return expand_inputs(validation)
    if isinstance(images, (str, Path)) and (Path(images) / "validation" / "good").is_dir():
        return expand_inputs(Path(images) / "validation" / "good")
    return []

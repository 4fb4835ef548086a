"""Run an exported model without torch: onnxruntime or OpenVINO, plus a small numpy step.

The numpy step (documented, and tested against the torch code it mirrors):

1. decode the image and apply the model's ROI steps (``inputs.load_input``, ``data.roi`` -
   the same torch-free code ``Detector`` uses);
2. resize to the model's image size with antialiased bilinear filtering - the weights of
   torch's ``interpolate(mode="bilinear", antialias=True, align_corners=False)`` (PIL's
   triangle filter), as separable weight matrices (``resize_weights``);
3. run the graph (``images`` (N, 3, H, W) in [0, 1] -> ``anomaly_map`` (N, H, W), ``score`` (N,));
4. resize each map to its prepared image's size (plain bilinear, ``align_corners=False``) and
   judge it with the threshold(s) and inspection rules stored beside the graph
   (``verdicts.judge``, the same code as ``Detector``).

Nothing here imports torch. p-values and z-scores need the calibration model (torch side):
exported predictions leave them None.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from defectlens.data.roi import Preprocess
from defectlens.errors import ConfigError, ImageReadError, ModelFileError
from defectlens.inputs import ImageInput, load_input
from defectlens.results import Prediction
from defectlens.rules import InspectionRules
from defectlens.verdicts import NOT_OK, judge

METADATA_FILE = "defectlens_export.json"
RUNTIMES = ("onnxruntime", "openvino")


def resize_weights(source: int, target: int, antialias: bool) -> np.ndarray:
    """(target, source) float64 matrix of bilinear resampling along one axis, as torch's
    ``interpolate(mode="bilinear", align_corners=False)`` (with ``antialias``: its
    ``_upsample_bilinear2d_aa``, PIL's triangle filter widened by the scale when shrinking)."""
    weights = np.zeros((target, source))
    scale = source / target
    if not antialias:  # in float32, as torch computes the source coordinates
        half = np.float32(0.5)
        centre = np.maximum((np.arange(target, dtype=np.float32) + half) * np.float32(scale) - half, np.float32(0.0))
        low = np.floor(centre).astype(np.int64)
        frac = centre - low
        for i in range(target):
            weights[i, min(low[i], source - 1)] += 1.0 - frac[i]
            weights[i, min(low[i] + 1, source - 1)] += frac[i]
        return weights
    f32 = np.float32
    scale32 = f32(scale)
    stretch = max(scale32, f32(1.0))  # the triangle (half-width 1) widens by the scale when shrinking
    inverse = f32(1.0) / stretch
    for i in range(target):  # float32, as torch's kernel
        centre = scale32 * (f32(i) + f32(0.5))
        first = max(int(centre - stretch + f32(0.5)), 0)
        last = min(int(centre + stretch + f32(0.5)), source)
        taps = np.arange(first, last, dtype=np.float32)
        values = np.maximum(f32(0.0), f32(1.0) - np.abs((taps - centre + f32(0.5)) * inverse))
        total = values.sum(dtype=np.float32)
        weights[i, first:last] = values / total if total > 0 else 0.0
    return weights


def resize(image: np.ndarray, size: tuple[int, int], antialias: bool) -> np.ndarray:
    """(H, W) or (H, W, C) float32 -> (*size) or (*size, C) float32, bilinear (see above)."""
    height, width = image.shape[:2]
    if (height, width) == tuple(size):
        return image.astype(np.float32, copy=False)
    rows = resize_weights(height, size[0], antialias).astype(np.float32)
    cols = resize_weights(width, size[1], antialias).astype(np.float32)
    if image.ndim == 2:
        return rows @ image.astype(np.float32) @ cols.T
    return np.einsum("ij,jkc,lk->ilc", rows, image.astype(np.float32), cols, optimize=True)


class ExportedDetector:
    """An exported model directory (graph + ``defectlens_export.json``) on a runtime.

    Args:
        directory: what ``defectlens export`` wrote.
        runtime: "onnxruntime" or "openvino".
        threads: intra-op threads of the runtime (None: its default).
        batch_size: images per graph run (default: the exported model's).
    """

    def __init__(self, directory: str | Path, runtime: str = "onnxruntime", threads: int | None = None,
                 batch_size: int | None = None) -> None:
        self.directory = Path(directory)
        path = self.directory / METADATA_FILE
        if not path.is_file():
            raise ModelFileError(f"{self.directory}: not an exported model (no {METADATA_FILE})")
        self.metadata: dict[str, Any] = json.loads(path.read_text())
        if runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        self.runtime = runtime
        self.image_size = tuple(self.metadata["image_size"])
        self.threshold = float(self.metadata["threshold"])
        self.review_threshold = self.metadata.get("review_threshold")
        self.rules = InspectionRules.from_dict(self.metadata.get("rules"))
        self.roi = Preprocess.from_dict(self.metadata.get("preprocess"))
        self.batch_size = int(batch_size or self.metadata.get("batch_size", 1))
        self._run = self._open(runtime, threads)

    def _open(self, runtime: str, threads: int | None):
        files = self.metadata["files"]
        if runtime == "onnxruntime":
            try:
                import onnxruntime
            except ImportError:  # pragma: no cover - depends on the install
                raise ConfigError("--runtime onnxruntime needs onnxruntime (pip install 'defectlens[export]')") from None
            options = onnxruntime.SessionOptions()
            if threads:
                options.intra_op_num_threads = int(threads)
                options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(
                str(self.directory / files["onnx"]), options, providers=["CPUExecutionProvider"]
            )
            return lambda batch: session.run(["anomaly_map", "score"], {"images": batch})
        try:
            import openvino
        except ImportError:  # pragma: no cover - depends on the install
            raise ConfigError("--runtime openvino needs openvino (pip install openvino)") from None
        model_file = files.get("openvino") or files["onnx"]
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}  # no bf16/fp16 shortcuts: parity
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        compiled = openvino.Core().compile_model(str(self.directory / model_file), "CPU", config)
        request = compiled.create_infer_request()

        def run(batch: np.ndarray) -> list[np.ndarray]:
            result = request.infer({"images": batch})
            return [np.asarray(result[compiled.output(name)]) for name in ("anomaly_map", "score")]

        return run

    # ------------------------------------------------------------------ scoring
    def model_input(self, pixels: np.ndarray) -> np.ndarray:
        """A prepared image (H, W, 3) -> the graph's input (3, *image_size) float32."""
        resized = resize(pixels, self.image_size, antialias=True)
        return np.ascontiguousarray(resized.transpose(2, 0, 1), dtype=np.float32)

    def score_prepared(self, images: Sequence[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        """(score, map at the prepared image's size) of prepared images, ``batch_size`` per run."""
        results = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            maps, scores = self._run(np.stack([self.model_input(image) for image in chunk]))
            for image, anomaly_map, score in zip(chunk, maps, scores):
                full = resize(anomaly_map, image.shape[:2], antialias=False)
                results.append((float(score), full))
        return results

    def prepare(self, image: ImageInput, index: int = 0) -> tuple[np.ndarray, str | None]:
        pixels, source = load_input(image, index)
        return (self.roi.apply(pixels) if len(self.roi) else pixels), source

    def iter_predictions(
        self, images: Sequence[ImageInput], threshold: float | None = None
    ) -> Iterator[tuple[ImageInput, Prediction | ImageReadError]]:
        """As ``Detector.iter_predictions``: (input, Prediction or ImageReadError), in order."""
        decision = self.threshold if threshold is None else float(threshold)
        review = self.review_threshold if threshold is None else None
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            prepared: list[tuple[np.ndarray, str | None] | ImageReadError] = []
            for offset, image in enumerate(chunk):
                try:
                    prepared.append(self.prepare(image, start + offset))
                except ImageReadError as error:
                    prepared.append(error)
            readable = [item for item in prepared if not isinstance(item, ImageReadError)]
            scored = iter(self.score_prepared([pixels for pixels, _ in readable]))
            for image, item in zip(chunk, prepared):
                if isinstance(item, ImageReadError):
                    yield image, item
                    continue
                score, anomaly_map = next(scored)
                judged = judge(score, anomaly_map, decision, review, self.rules)
                yield image, Prediction(
                    judged.score, anomaly_map, judged.mask, judged.verdict == NOT_OK, decision, item[1], item[0],
                    judged.verdict, review, None, None, judged.reasons, judged.defects,
                )

    def predict_batch(self, images: Sequence[ImageInput], threshold: float | None = None) -> list[Prediction]:
        predictions = []
        for _, outcome in self.iter_predictions(images, threshold):
            if isinstance(outcome, ImageReadError):
                raise outcome
            predictions.append(outcome)
        return predictions

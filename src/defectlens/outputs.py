"""What an inspection leaves behind: the heat-map overlay, the mask, the anomaly map and the
results row - rendered once here for the CLI, the demo and the service.

`render` turns a `Prediction` into encoded files (PNG overlay, PNG mask, float16 .npy map);
`ResultsWriter` writes them into ``heatmaps/`` and ``masks/`` beside a ``results.jsonl``
(the CLI and the demo); the service puts the same bytes into its content-addressed store.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Sequence

import cv2
import numpy as np

from defectlens.visualize import mask_image, overlay_heatmap

if TYPE_CHECKING:
    from defectlens.detector import Prediction


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W) or RGB (H, W, 3) -> PNG bytes (fast zlib level)."""
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:  # pragma: no cover - cv2 only fails on empty arrays
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def encode_map(anomaly_map: np.ndarray) -> bytes:
    """A float anomaly map (H, W) as float16 .npy bytes (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, anomaly_map.astype(np.float16), allow_pickle=False)
    return buffer.getvalue()


def heatmap_png(image: np.ndarray, anomaly_map: np.ndarray, threshold: float) -> bytes:
    """The jet overlay of a map on its (prepared) image, mask outline at ``threshold``, as PNG."""
    return encode_png(overlay_heatmap(image, anomaly_map, threshold, anomaly_map > threshold))


def mask_png(anomaly_map: np.ndarray, threshold: float) -> bytes:
    """The defect mask (map > threshold) as a {0, 255} PNG."""
    return encode_png(mask_image(anomaly_map > threshold))


@dataclass(frozen=True)
class RenderedPrediction:
    """Encoded outputs of one prediction."""

    heatmap_png: bytes
    mask_png: bytes
    map_npy: bytes


def render(prediction: "Prediction") -> RenderedPrediction:
    """Overlay, mask and map of a prediction (drawn on the prepared image it scored)."""
    return RenderedPrediction(
        heatmap_png=heatmap_png(prediction.image, prediction.anomaly_map, prediction.threshold),
        mask_png=encode_png(mask_image(prediction.mask)),
        map_npy=encode_map(prediction.anomaly_map),
    )


def result_record(prediction: "Prediction", **extra: Any) -> dict[str, Any]:
    """The JSON row of a prediction: path, verdict, score (also as p-value and z), thresholds,
    why (reasons, defects), plus ``extra``."""
    return {
        "path": prediction.source,
        "verdict": prediction.verdict,
        "score": prediction.score,
        "p_value": prediction.p_value,
        "z_score": prediction.z_score,
        "is_anomalous": prediction.is_anomalous,
        "threshold": prediction.threshold,
        "review_threshold": prediction.review_threshold,
        "reasons": prediction.reasons,
        "defects": prediction.defects,
        **extra,
    }


def output_stems(paths: Sequence[Path]) -> list[str]:
    """Unique file stems for outputs (index and parent folder prepended where names collide)."""
    stems = [path.stem for path in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{index:05d}_{path.parent.name}_{path.stem}" for index, path in enumerate(paths)]


class ResultsWriter:
    """Writes ``heatmaps/<stem>_heatmap.png``, ``masks/<stem>_mask.png`` and one JSON line per
    image (or per failed input) to ``results.jsonl`` in ``out_dir``; appends, flushes each row.

    Use as a context manager: ``with ResultsWriter(out) as writer: writer.write(stem, prediction)``.
    """

    def __init__(self, out_dir: str | Path, results_name: str = "results.jsonl", append: bool = True) -> None:
        self.out_dir = Path(out_dir)
        (self.out_dir / "heatmaps").mkdir(parents=True, exist_ok=True)
        (self.out_dir / "masks").mkdir(parents=True, exist_ok=True)
        self.results_path = self.out_dir / results_name
        self._mode = "a" if append else "w"
        self._file: IO[str] | None = None

    def __enter__(self) -> "ResultsWriter":
        self._file = open(self.results_path, self._mode, encoding="utf-8")
        return self

    def __exit__(self, *_: Any) -> None:
        if self._file is not None:
            self._file.close()

    def write(self, stem: str, prediction: "Prediction") -> dict[str, Any]:
        """Write one prediction's pictures and row; returns the row."""
        rendered = render(prediction)
        heatmap_path = self.out_dir / "heatmaps" / f"{stem}_heatmap.png"
        mask_path = self.out_dir / "masks" / f"{stem}_mask.png"
        heatmap_path.write_bytes(rendered.heatmap_png)
        mask_path.write_bytes(rendered.mask_png)
        return self._row(result_record(prediction, heatmap=str(heatmap_path), mask=str(mask_path)))

    def write_error(self, path: str | Path, error: Exception) -> dict[str, Any]:
        """The row of an input that could not be inspected."""
        return self._row({"path": str(path), "error": str(error)})

    def _row(self, record: dict[str, Any]) -> dict[str, Any]:
        assert self._file is not None, "use ResultsWriter as a context manager"
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        return record

"""Export a fitted detector to ONNX (and OpenVINO IR), to run without torch.

    defectlens export part.dlens --format onnx --out part_onnx/
    defectlens predict --model part_onnx/ --runtime onnxruntime images/ --out results/

The directory holds ``model.onnx`` (``images`` (N, 3, H, W) float32 RGB in [0, 1] at the
model's image size -> ``anomaly_map`` (N, H, W), ``score`` (N,): normalisation, backbone,
scoring, pooling, upsampling and blur are in the graph; see ``export.graph``), with
``--format openvino`` also ``model.xml`` / ``model.bin``, and ``defectlens_export.json``: the
thresholds, inspection rules, ROI steps, image size and the model's provenance. The numpy
step around the graph (decode, ROI, antialiased resize in; map resize and verdict out) is
``export.runtime``. Parity with the torch model is tested (tests/unit/test_export.py).

Covered: PatchCore, Sequential PatchCore, PaDiM, whole images (no tiling, no circular padding).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from defectlens._version import __version__
from defectlens.errors import ConfigError
from defectlens.export.runtime import METADATA_FILE

FORMATS = ("onnx", "openvino")
OPSET = 17
MAX_DISTANCES = 2**26  # 256 MB of float32 query x bank distances per graph run (memory banks)


def export_detector(detector: Any, out_dir: str | Path, format: str = "onnx", source: str | Path | None = None) -> Path:
    """Write the exported graph and its metadata to ``out_dir``; returns the directory.

    Args:
        detector: a fitted ``Detector`` (on the CPU).
        out_dir: created if missing; existing export files are overwritten.
        format: "onnx", or "openvino" (the ONNX file plus OpenVINO IR converted from it).
        source: the model file it came from (recorded with its SHA-256).
    """
    import torch

    from defectlens.export.graph import DetectorGraph

    if format not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    graph = DetectorGraph(detector)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, 3, *detector.image_size, generator=torch.Generator().manual_seed(0))
    onnx_path = out / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shape-dependent Python branches (static here)
        torch.onnx.export(
            graph, (example,), str(onnx_path), input_names=["images"], output_names=["anomaly_map", "score"],
            dynamic_axes={"images": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )
    files = {"onnx": onnx_path.name}
    if format == "openvino":
        try:
            import openvino
        except ImportError:
            raise ConfigError("--format openvino needs openvino (pip install openvino)") from None
        openvino.save_model(openvino.convert_model(str(onnx_path)), str(out / "model.xml"), compress_to_fp16=False)
        files["openvino"] = "model.xml"
    metadata = {
        "format_version": 1,
        "defectlens_version": __version__,
        "method": detector.method_name,
        "method_options": detector.method.config(),
        "backbone": detector.backbone,
        "layers": list(detector.layers),
        "image_size": list(detector.image_size),
        "batch_size": _batch_size(detector, graph),
        "blur_sigma": detector.blur_sigma,
        "pool_size": detector.pool_size,
        "threshold": detector.threshold,
        "review_threshold": detector.review_threshold,
        "rules": detector.rules.to_dict(),
        "preprocess": detector.preprocess.to_dict(),
        "files": files,
        "inputs": {"images": "float32 (N, 3, H, W) RGB in [0, 1], H x W = image_size, after the ROI steps and "
                             "an antialiased bilinear resize (export.runtime)"},
        "outputs": {"anomaly_map": "float32 (N, H, W) at image_size", "score": "float32 (N,) image score"},
        "source": None if source is None else {"path": str(source), "sha256": _sha256(Path(source))},
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return out


def _batch_size(detector: Any, graph: Any) -> int:
    """The model's batch size, capped for memory banks so that one run's (N, h*w, M) distance
    matrix stays within ``MAX_DISTANCES`` floats (the graph has no chunked search)."""
    bank = getattr(graph.scores, "bank", None)
    if bank is None:
        return int(detector.batch_size)
    patches = graph.features.grid[0] * graph.features.grid[1]
    return max(1, min(int(detector.batch_size), MAX_DISTANCES // max(1, patches * int(bank.shape[0]))))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

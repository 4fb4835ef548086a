"""Model files: one safetensors file holding tensors plus JSON metadata. Never pickle.

Layout: the safetensors header's ``__metadata__`` holds one key, ``defectlens``, whose value
is a JSON document with a SHA-256 over every tensor's name, dtype, shape and bytes. Loading
checks the format, the library version and that checksum, so a truncated, edited or foreign
file is refused with a clear ModelFileError instead of failing deep inside.

A detector's document: ``method`` and ``method_options`` (the method's constructor
arguments), ``detector`` (the Detector's constructor arguments, read from its signature),
``normalization`` (the backbone's input mean/std, for exports), ``weights_sha256``,
``threshold`` and ``fit`` (what fitting did). Files written before ``detector`` existed
(defectlens 0.1.0 before the method protocol) are read through `legacy_detector_params`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from defectlens._version import __version__
from defectlens.errors import ModelFileError
from defectlens.hashing import file_sha256

FORMAT = "defectlens-model"
FORMAT_VERSION = 1
_METADATA_KEY = "defectlens"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _same_minor_version(version_a: str, version_b: str) -> bool:
    return version_a.split(".")[:2] == version_b.split(".")[:2]


def save_model(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write tensors and JSON metadata to `path` (parent folders are created)."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "tensors_sha256": tensors_digest(contiguous),
        **metadata,
    }
    temporary = file.with_name(file.name + ".tmp")
    save_file(contiguous, str(temporary), metadata={_METADATA_KEY: json.dumps(document)})
    temporary.replace(file)  # atomic: a crash never leaves a half-written model file
    return file


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a model file, checked for format and library version."""
    file = Path(path)
    if not file.is_file():
        raise ModelFileError(f"model file not found: {file}")
    try:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(_METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{file} is not a defectlens model file (unreadable: {error})") from None
    if raw is None:
        raise ModelFileError(f"{file} is a safetensors file but not a defectlens model (no metadata)")
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{file}: model metadata is corrupt ({error})") from None
    if document.get("format") != FORMAT or document.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{file}: unsupported model format {document.get('format')!r} "
            f"version {document.get('format_version')!r} (expected {FORMAT!r} {FORMAT_VERSION})"
        )
    written_by = str(document.get("library_version", "unknown"))
    if not _same_minor_version(written_by, __version__):
        raise ModelFileError(
            f"{file} was written by defectlens {written_by}; this is defectlens {__version__}. "
            "Refit the model with this version (model files are not converted between versions)."
        )
    return document


def load_model(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a model file; ModelFileError if tampered, foreign or outdated."""
    document = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ModelFileError(f"{path}: model tensors are unreadable ({error})") from None
    if tensors_digest(tensors) != document.get("tensors_sha256"):
        raise ModelFileError(f"{path}: model tensors do not match their checksum (file modified or damaged)")
    return tensors, document


def legacy_detector_params(document: dict[str, Any]) -> dict[str, Any]:
    """Detector arguments of a file written before the ``detector`` section existed."""
    pre, post = document["preprocessing"], document["postprocessing"]
    return {
        "backbone": document["backbone"],
        "image_size": pre["image_size"],
        "layers": document.get("layers"),
        "weights": document.get("weights"),
        "batch_size": document.get("batch_size", 16),
        "blur_sigma": post["blur_sigma"],
        "target_fpr": document.get("target_fpr", 0.01),
        "calibration_images": document.get("calibration_images", 40),
        "calibration_folds": document.get("calibration_folds", 5),
        "preprocess": pre.get("roi"),
        "circular_padding": pre.get("circular_padding", False),
        "seed": document.get("seed", 0),
        "pool_size": post.get("pool_size", 1),
        "tile_size": pre.get("tile_size"),
        "tile_overlap": pre.get("tile_overlap", 32),
        "augmentation": document.get("augmentation"),
    }


def legacy_fit_info(fit: dict[str, Any]) -> dict[str, Any]:
    """The ``fit`` section of such a file (its calibration summary was ``calibration_scores``)."""
    upgraded = dict(fit)
    if "calibration_scores" in upgraded:
        upgraded["calibration"] = upgraded.pop("calibration_scores")
    return upgraded


@dataclass
class DetectorFile:
    """What a detector's model file holds: the method's name, options and state tensors, the
    Detector's constructor arguments, the threshold, the fit summary and the whole document."""

    method: str
    method_options: dict[str, Any]
    params: dict[str, Any]
    threshold: float
    fit: dict[str, Any]
    method_state: dict[str, torch.Tensor]
    document: dict[str, Any]


def write_detector(path: str | Path, contents: DetectorFile, normalization: dict[str, list[float]]) -> Path:
    """Save a detector (``contents.document`` is ignored; ``normalization`` is the backbone's)."""
    weights = contents.params.get("weights")
    metadata = {
        "method": contents.method,
        "method_options": contents.method_options,
        "detector": contents.params,
        "normalization": normalization,
        "weights_sha256": file_sha256(weights) if weights else None,
        "threshold": contents.threshold,
        "fit": contents.fit,
    }
    return save_model(path, {f"method.{name}": tensor for name, tensor in contents.method_state.items()}, metadata)


def read_detector(path: str | Path) -> DetectorFile:
    """Read a detector's model file, of this layout or the legacy one; ModelFileError if damaged,
    foreign, or if its backbone weights file changed since it was fitted."""
    tensors, document = load_model(path)
    try:
        legacy = "detector" not in document
        params = legacy_detector_params(document) if legacy else dict(document["detector"])
        weights = params.get("weights")
        if weights and document.get("weights_sha256") and Path(weights).is_file():
            if file_sha256(weights) != document["weights_sha256"]:
                raise ModelFileError(f"{path}: backbone weights {weights} changed since the model was fitted")
        fit = document.get("fit", {})
        return DetectorFile(
            method=document["method"],
            method_options=dict(document["method_options"]),
            params=params,
            threshold=float(document["threshold"]),
            fit=legacy_fit_info(fit) if legacy else dict(fit),
            method_state={name.removeprefix("method."): t for name, t in tensors.items() if name.startswith("method.")},
            document=document,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: model metadata is incomplete or invalid ({error!r})") from None

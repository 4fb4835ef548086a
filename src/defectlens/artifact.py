"""Model files: one safetensors file holding tensors plus JSON metadata. Never pickle.

Layout: the safetensors header's ``__metadata__`` holds one key, ``defectlens``, whose value
is a JSON document (method, backbone, preprocessing, threshold, library version, ...) with a
SHA-256 over every tensor's name, dtype, shape and bytes. Loading checks the format, the
library version and that checksum, so a truncated, edited or foreign file is refused with a
clear ModelFileError instead of failing deep inside.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from defectlens import __version__
from defectlens.errors import ModelFileError

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

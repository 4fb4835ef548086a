"""Model files: one safetensors file holding tensors plus JSON metadata, sealed whole. Never pickle.

Layout: the safetensors header's ``__metadata__`` holds one key, ``defectlens``, whose value
is a JSON document with a SHA-256 over every tensor's name, dtype, shape and bytes
(``tensors_sha256``) and a ``seal`` over the whole document (format version 2): the SHA-256 -
or, with a model key, the HMAC-SHA256 - of the document's canonical JSON (sorted keys, no
spaces, the ``seal`` itself left out). The seal covers the threshold, the preprocessing, the
method and its options, the fit summary and (through ``tensors_sha256``) every tensor, so an
edited threshold or preprocessing is refused, not silently used. Loading checks the format,
the library version, the seal and the tensors' checksum; a truncated, edited or foreign file is
refused with one clear ModelFileError line instead of failing deep inside.

Keys: without a key the seal is a plain SHA-256, which catches accidental edits and naive
tampering (a hand-edited threshold) but not someone who recomputes it. With a key
(``DEFECTLENS_MODEL_KEY`` = the key text, ``DEFECTLENS_MODEL_KEY_FILE`` = a file holding it,
`set_model_key`, or ``serve --model-key-file``) files are written with an HMAC and only files
sealed with that key load: without the key nobody can re-seal an edited file.

Version-1 files (written before the seal existed) are refused: their metadata could have been
edited unnoticed. `upgrade_model` (``defectlens upgrade-model OLD --out NEW``) re-seals one
whose origin the user vouches for. `reseal` is how a legitimate edit (inspection rules,
recalibration) writes a changed document: it checks the current seal first.

A detector's document: ``method`` and ``method_options`` (the method's constructor
arguments), ``detector`` (the Detector's constructor arguments, read from its signature),
``normalization`` (the backbone's input mean/std, for exports), ``weights_sha256``,
``threshold`` and ``fit`` (what fitting did). Files written before ``detector`` existed
(defectlens 0.1.0 before the method protocol) are read through `legacy_detector_params`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from defectlens._version import __version__
from defectlens.errors import ConfigError, ModelFileError
from defectlens.hashing import file_sha256

FORMAT = "defectlens-model"
FORMAT_VERSION = 2
UNSEALED_FORMAT_VERSION = 1  # written before the seal existed: refused, `upgrade_model` re-seals
_METADATA_KEY = "defectlens"
_SEAL = "seal"
_PROTECTED = frozenset({"format", "format_version", "library_version", "tensors_sha256", _SEAL})
MODEL_KEY_ENV = "DEFECTLENS_MODEL_KEY"
MODEL_KEY_FILE_ENV = "DEFECTLENS_MODEL_KEY_FILE"
UPGRADE_COMMAND = "defectlens upgrade-model"
_model_key: bytes | None = None


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


# ---------------------------------------------------------------------------------- keys and seals
def read_model_key_file(path: str | Path) -> bytes:
    """The key in a file (surrounding whitespace stripped); ConfigError if missing or empty."""
    file = Path(path)
    try:
        key = file.read_bytes().strip()
    except OSError as error:
        raise ConfigError(f"cannot read the model key file {file}: {error.strerror or error}") from None
    if not key:
        raise ConfigError(f"the model key file {file} is empty")
    return key


def set_model_key(key: bytes | str | None) -> bytes | None:
    """Use this key (HMAC) for every model file written and read in this process; None falls back to
    the environment. Returns the previous explicit key."""
    global _model_key
    previous = _model_key
    if isinstance(key, str):
        key = key.encode()
    if key is not None and not key.strip():
        raise ConfigError("the model key is empty")
    _model_key = key
    return previous


def model_key() -> bytes | None:
    """The key in force: `set_model_key`, else $DEFECTLENS_MODEL_KEY, else $DEFECTLENS_MODEL_KEY_FILE; or None."""
    if _model_key is not None:
        return _model_key
    text = os.environ.get(MODEL_KEY_ENV, "").strip()
    if text:
        return text.encode()
    path = os.environ.get(MODEL_KEY_FILE_ENV, "").strip()
    return read_model_key_file(path) if path else None


def _canonical(document: dict[str, Any]) -> bytes:
    body = {name: value for name, value in document.items() if name != _SEAL}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def compute_seal(document: dict[str, Any], key: bytes | None) -> dict[str, str]:
    """{"algorithm": "sha256" | "hmac-sha256", "digest": hex} over the document without its seal."""
    canonical = _canonical(json.loads(json.dumps(document)))  # as a reader will see it (str keys, lists)
    if key:
        return {"algorithm": "hmac-sha256", "digest": hmac.new(key, canonical, hashlib.sha256).hexdigest()}
    return {"algorithm": "sha256", "digest": hashlib.sha256(canonical).hexdigest()}


def check_seal(file: Path | str, document: dict[str, Any], key: bytes | None, require_key: bool = True) -> None:
    """ModelFileError (one line) unless the document's seal verifies; with a key in force (and
    `require_key`), only a seal made with that key is accepted."""
    seal = document.get(_SEAL)
    algorithm = seal.get("algorithm") if isinstance(seal, dict) else None
    if algorithm not in ("sha256", "hmac-sha256") or not isinstance(seal.get("digest"), str):
        raise ModelFileError(f"{file}: the model file has no valid seal (metadata not protected); the file is not trusted")
    if algorithm == "hmac-sha256" and not key:
        raise ModelFileError(
            f"{file} is sealed with a model key (HMAC): set {MODEL_KEY_ENV} or {MODEL_KEY_FILE_ENV} "
            "(serve: --model-key-file) to load it"
        )
    if algorithm == "sha256" and key and require_key:
        raise ModelFileError(
            f"{file} is sealed without a key but a model key is in force, so it is not trusted; if you vouch "
            f"for the file, re-seal it under the key: {UPGRADE_COMMAND} {file} --out NEW.dlens"
        )
    expected = compute_seal(document, key if algorithm == "hmac-sha256" else None)["digest"]
    if not hmac.compare_digest(expected, seal["digest"]):
        raise ModelFileError(
            f"{file}: the model metadata does not match its seal (threshold, preprocessing or method settings "
            "edited after the file was written" + (", or another model key" if algorithm == "hmac-sha256" else "")
            + "); the file is refused: use the original or refit"
        )


# ---------------------------------------------------------------------------------- files
def _write(file: Path, tensors: dict[str, torch.Tensor], document: dict[str, Any], key: bytes | None) -> Path:
    """Seal `document` (format version 2) and write it with the tensors, atomically."""
    file.parent.mkdir(parents=True, exist_ok=True)
    sealed = {name: value for name, value in document.items() if name != _SEAL}
    sealed["format_version"] = FORMAT_VERSION
    sealed["tensors_sha256"] = tensors_digest(tensors)
    sealed[_SEAL] = compute_seal(sealed, key)
    temporary = file.with_name(file.name + ".tmp")
    save_file(tensors, str(temporary), metadata={_METADATA_KEY: json.dumps(sealed)})
    temporary.replace(file)  # atomic: a crash never leaves a half-written model file
    return file


def save_model(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write tensors and JSON metadata to `path` (parent folders are created), sealed with the
    key in force (`model_key`), if any."""
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__, **metadata}
    return _write(Path(path), contiguous, document, model_key())


def _read_document(file: Path) -> dict[str, Any]:
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
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise ModelFileError(f"{file}: unsupported model format {found!r} (expected {FORMAT!r})")
    written_by = str(document.get("library_version", "unknown"))
    if not _same_minor_version(written_by, __version__):
        raise ModelFileError(
            f"{file} was written by defectlens {written_by}; this is defectlens {__version__}. "
            "Refit the model with this version (model files are not converted between versions)."
        )
    return document


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a model file, checked for format, library version and seal."""
    file = Path(path)
    document = _read_document(file)
    version = document.get("format_version")
    if version == UNSEALED_FORMAT_VERSION:
        raise ModelFileError(
            f"{file} is a version-1 model file whose metadata is not sealed (its threshold or preprocessing "
            f"could have been edited unnoticed); if you trust it, re-seal it: {UPGRADE_COMMAND} {file} --out NEW.dlens"
        )
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{file}: unsupported model format version {version!r} (expected {FORMAT_VERSION})")
    check_seal(file, document, model_key())
    return document


def _load_tensors(file: Path, document: dict[str, Any]) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ModelFileError(f"{file}: model tensors are unreadable ({error})") from None
    if tensors_digest(tensors) != document.get("tensors_sha256"):
        raise ModelFileError(f"{file}: model tensors do not match their checksum (file modified or damaged)")
    return tensors


def load_model(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a model file; ModelFileError if tampered, unsealed, foreign or outdated."""
    document = read_metadata(path)
    return _load_tensors(Path(path), document), document


def reseal(
    path: str | Path, metadata_update: dict[str, Any], out: str | Path | None = None, key: bytes | None = None
) -> Path:
    """Change top-level metadata entries of a sealed model file and seal it again (rules, recalibration).

    The file's current seal is checked first (an edited file cannot be laundered this way);
    the format fields, ``tensors_sha256`` and ``seal`` cannot be set. Writes `out` (default:
    `path`, replaced atomically) sealed with `key` (default: the key in force). Returns the file written.
    """
    tensors, document = load_model(path)
    refused = sorted(set(metadata_update) & _PROTECTED)
    if refused:
        raise ConfigError(f"reseal cannot set {', '.join(refused)} (written by the library itself)")
    document.update(metadata_update)
    return _write(Path(out or path), tensors, document, model_key() if key is None else key)


def upgrade_model(path: str | Path, out: str | Path, key: bytes | None = None) -> Path:
    """Seal a file the user vouches for: a version-1 file (no seal), or a version-2 file sealed
    without a key, to be sealed under `key` (default: the key in force). The tensors' checksum
    is still checked. Returns `out`."""
    file = Path(path)
    document = _read_document(file)
    version = document.get("format_version")
    if version not in (UNSEALED_FORMAT_VERSION, FORMAT_VERSION):
        raise ModelFileError(f"{file}: unsupported model format version {version!r} (expected 1 or {FORMAT_VERSION})")
    key = model_key() if key is None else key
    if version == FORMAT_VERSION:
        check_seal(file, document, key, require_key=False)
    tensors = _load_tensors(file, document)
    return _write(Path(out), tensors, document, key)


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
        "threshold_model": "quantile",  # the rule of those versions
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
    review_threshold: float | None = None
    normal_scores: dict[str, Any] | None = None
    """The calibration's held-out normal scores and tail fit (`calibration.NormalScoreModel`)."""


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
        "review_threshold": contents.review_threshold,
        "normal_scores": contents.normal_scores,
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
            review_threshold=None if document.get("review_threshold") is None else float(document["review_threshold"]),
            normal_scores=document.get("normal_scores"),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: model metadata is incomplete or invalid ({error!r})") from None

"""The inspection REST service (FastAPI): a thin layer over `Detector` and the inspection log.

    POST /v1/inspect                          multipart: image, [model], [threshold]; [Idempotency-Key]
    GET  /v1/inspections                      ?limit&offset&model&verdict|is_anomalous&since&until
    GET  /v1/inspections/{id}                 one inspection
    GET  /v1/inspections/{id}/image.png       the input image (re-encoded PNG, never the raw upload)
    GET  /v1/inspections/{id}/heatmap.png     heat-map overlay        [?threshold=T re-renders]
    GET  /v1/inspections/{id}/mask.png        defect mask             [?threshold=T re-thresholds]
    POST /v1/inspections/{id}/review          operator decision (good / defect), audited (`reviews.py`)
    GET  /v1/inspections/{id}/reviews         the decisions, oldest first
    GET  /v1/monitor                          drift: recent scores vs calibration, per model (`monitor.py`)
    GET  /v1/models, GET /v1/whoami, GET /health, GET / (operator UI), GET /docs (OpenAPI)

Models are loaded once, before the server starts. Inspections (decoding, the model, pictures,
storing) run on the bounded, time-limited `InspectionQueue` (429 / 503 / 504, see
`limits.py`); a model's forward passes never overlap (one lock per model). Every accepted
inspection is stored - files first, then the database row; a failed or non-finite one never
is. Access control, CSRF and security headers are `security.py`'s middleware; client-facing
messages are short and generic (`errors.py`). New routes (reviews, monitoring) are added with
an ``_add_*_routes(app, service)`` function in `create_app` and inherit all of that.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from fastapi import FastAPI, File, Form, Header, Query, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from defectlens._version import __version__
from defectlens.data.images import DecodeLimits, decode_image_bytes
from defectlens.detector import Detector, Prediction
from defectlens.errors import ConfigError, DefectlensError, ImageReadError
from defectlens.hashing import file_sha256, sha256_hex
from defectlens.service import monitor, pictures
from defectlens.service.errors import ApiError, ErrorGuard, clip, image_error, quoted, validation_message
from defectlens.service.limits import InspectionQueue, Job, PixelBudget, UploadLimit, header_pixels, megabytes
from defectlens.service.security import (
    AuthGuard, HostGuard, OriginGuard, SecurityConfig, SecurityHeaders,
)
from defectlens.service.reviews import add_review_routes
from defectlens.service.store import (
    FileStore, Inspection, InspectionQuery, InspectionStore, Review, check_db_url, default_db_url,
)

logger = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
INSPECTION_ID = re.compile(r"^[0-9a-f]{32}$")
REQUEST_KEY = re.compile(r"^[\x21-\x7e]{1,64}$")  # printable ASCII, no spaces
DEFAULT_MAX_UPLOAD_MB = 20.0
MAX_OFFSET = 1_000_000  # deeper pages: narrow with since/until
MONITOR_EVERY = 20  # inspections of a model between two drift checks written to the log
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may cost (``serve`` options of the same names)."""

    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1024 * 1024)
    max_image_megapixels: float = 16.0  # decoded; about 4900 x 3300 px
    workers: int = 2  # inspections running at once
    queue: int = 8  # inspections waiting for a worker; one more gets 429
    timeout_s: float = 60.0  # per inspection, waiting included: 503 (queued) / 504 (running)
    max_picture_side: int = pictures.MAX_PICTURE_SIDE  # stored pictures and maps

    def decode_limits(self) -> DecodeLimits:
        """Decode limits of an upload: the pixel budget, 12 bytes per pixel decoded, the upload size."""
        if not (self.max_image_megapixels > 0) or self.max_picture_side < 16:
            raise ConfigError(f"--max-image-megapixels must be > 0, got {self.max_image_megapixels}")
        pixels = max(1, int(self.max_image_megapixels * 1e6))
        return DecodeLimits(max_pixels=pixels, max_decoded_bytes=pixels * 12, max_file_bytes=max(1, self.max_upload_bytes))


def parse_threshold(value: str | float | None, where: str = "threshold") -> float | None:
    """None, or a finite number >= 0; ApiError(422) otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ApiError(422, f"{where} must be a number, got {quoted(value)}") from None
    if not math.isfinite(number) or number < 0:
        raise ApiError(422, f"{where} must be a finite number >= 0, got {quoted(value)}")
    return number


def clean_name(name: str | None) -> str:
    """A client's file name as stored and shown: control characters and lone surrogates
    replaced, at most 255 characters (start and end kept)."""
    text = _CONTROL.sub("?", name or "upload").encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= 255 else text[:100] + "..." + text[-152:]


# ---------------------------------------------------------------------------------- models
@dataclass
class ModelSlot:
    """A loaded model, its file's identity and the lock that serializes its forward passes."""

    name: str
    path: Path
    sha256: str
    detector: Detector
    lock: threading.Lock = field(default_factory=threading.Lock)

    def predict(self, pixels: np.ndarray, threshold: float | None) -> Prediction:
        with self.lock:
            return self.detector.predict(pixels, threshold=threshold)

    def warm_up(self) -> None:
        height, width = self.detector.image_size
        self.predict(np.zeros((height, width, 3), dtype=np.float32), None)

    def prepared(self, pixels: np.ndarray) -> np.ndarray:
        """A stored input as the model saw it (after its ROI steps), to draw an overlay on again."""
        preprocess = self.detector.preprocess
        return preprocess.apply(pixels) if len(preprocess) else pixels

    def version_fields(self) -> dict[str, Any]:
        """The log's `ModelVersion` row of this file: thresholds, rules, calibration scores."""
        detector = self.detector
        return {
            "sha256": self.sha256, "name": self.name, "library_version": self.info()["library_version"] or None,
            "method": detector.method_name, "threshold": float(detector.threshold or 0.0),
            "review_threshold": detector.review_threshold, "target_fpr": detector.target_fpr,
            "review_fpr": detector.review_fpr, "rules": json.dumps(detector.rules.to_dict()),
            "normal_scores": monitor.normal_scores_json(detector.normal_scores),
        }

    def drift(self, recent: list[float]) -> monitor.DriftReport:
        detector = self.detector
        return monitor.drift_report(self.name, self.sha256, recent, detector.normal_scores,
                                    float(detector.threshold or 0.0), detector.review_threshold)

    def info(self, default: bool = False) -> dict[str, Any]:
        """What /v1/models says: no server path (the file's name only)."""
        detector = self.detector
        return {
            "name": self.name,
            "default": default,
            "file": self.path.name,
            "sha256": self.sha256,
            "method": detector.method_name,
            "backbone": detector.backbone,
            "image_size": list(detector.image_size),
            "threshold": float(detector.threshold or 0.0),
            "review_threshold": detector.review_threshold,
            "library_version": str(getattr(detector, "metadata", {}).get("library_version", "") or ""),
        }


def parse_model_spec(spec: str) -> tuple[str, Path]:
    """'NAME=PATH' or a bare 'PATH' (named by its file stem)."""
    name, sep, rest = spec.partition("=")
    if sep and MODEL_NAME.match(name) and rest:
        return name, Path(rest)
    path = Path(spec)
    stem = path.stem
    if not MODEL_NAME.match(stem):
        raise ConfigError(f"cannot name model {spec!r} after its file stem; give it as NAME={spec}")
    return stem, path


def parse_model_specs(specs: Sequence[str | tuple[str, str | Path]]) -> dict[str, Path]:
    """Names -> model files, checked (valid, unique names; at least one) without reading a file."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, path = parse_model_spec(spec) if isinstance(spec, str) else (spec[0], Path(spec[1]))
        if not MODEL_NAME.match(name):
            raise ConfigError(f"model name {name!r} may use letters, digits, '_', '-' and '.' only")
        if name in named:
            raise ConfigError(f"two models are named {name!r} ({named[name]} and {path}); use NAME=PATH")
        named[name] = path
    if not named:
        raise ConfigError("give at least one model (--model PATH or --model NAME=PATH)")
    return named


def load_models(specs: Sequence[str | tuple[str, str | Path]], warm_up: bool = True) -> dict[str, ModelSlot]:
    """Load every model once; ModelFileError (naming the file) if one is missing, broken or
    not sealed (see `artifact`). All files are read before any is warmed up (`warm_up`: build
    the backbone and run one blank image, so that the first request is not slow)."""
    slots: dict[str, ModelSlot] = {}
    for name, path in parse_model_specs(specs).items():
        detector = Detector.load(path)
        slots[name] = ModelSlot(name=name, path=path.resolve(), sha256=file_sha256(path), detector=detector)
    for name, slot in slots.items():
        if warm_up:
            slot.warm_up()
        logger.info("model %s loaded from %s (threshold %.4g)", name, slot.path, slot.detector.threshold)
    return slots


def image_extension(data: bytes) -> str:
    """File extension from the magic bytes (the original upload is stored verbatim, never served)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tif"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "img"


def verdict_columns(prediction: Prediction) -> dict[str, Any]:
    """The log's columns of a verdict: score, thresholds, state, p-value, z-score, reasons, defects."""
    def finite(value: float | None) -> float | None:
        return None if value is None or not math.isfinite(float(value)) else float(value)

    return {
        "score": float(prediction.score), "threshold": float(prediction.threshold),
        "is_anomalous": bool(prediction.is_anomalous), "verdict": str(prediction.verdict),
        "review_threshold": finite(prediction.review_threshold), "p_value": finite(prediction.p_value),
        "z_score": finite(prediction.z_score), "reasons": json.dumps([str(line) for line in prediction.reasons]),
        "defects": json.dumps(prediction.defects, default=float),
    }


# ---------------------------------------------------------------------------------- service
@dataclass(frozen=True)
class Upload:
    """One inspection request, checked: the model, the bytes, the client's name and options."""

    slot: ModelSlot
    data: bytes
    name: str
    threshold: float | None
    request_key: str | None
    started: float

    @property
    def sha256(self) -> str:
        return sha256_hex(self.data)


class InspectionService:
    """Inspect images with the loaded models and keep the log (no HTTP in here)."""

    def __init__(self, models: dict[str, ModelSlot], store: InspectionStore, files: FileStore,
                 limits: ServiceLimits | None = None) -> None:
        if not models:
            raise ConfigError("the service needs at least one model")
        self.models = models
        self.default_model = next(iter(models))
        self.store = store
        self.files = files
        self.limits = limits or ServiceLimits()
        self.max_upload_bytes = int(self.limits.max_upload_bytes)
        self.decode_limits = self.limits.decode_limits()
        self.queue = InspectionQueue(self.limits.workers, self.limits.queue, self.limits.timeout_s)
        self.budget = PixelBudget(self.decode_limits.max_pixels)
        self.cache = pictures.ByteCache()
        self.drift_status: dict[str, str] = {}
        self._since_drift_check: dict[str, int] = {}
        for slot in models.values():
            store.register_model(**slot.version_fields())

    def model(self, name: str | None) -> ModelSlot:
        name = name.strip() if name else None
        slot = self.models.get(name or self.default_model)
        if slot is None:
            available = sorted(self.models)
            raise ApiError(404, f"unknown model {quoted(name)}; available models: {', '.join(available)}", models=available)
        return slot

    def decode(self, data: bytes, name: str) -> np.ndarray:
        try:
            return decode_image_bytes(data, name, limits=self.decode_limits)
        except ImageReadError as error:
            logger.info("upload %r refused: %s", clip(name, 120), error)
            raise image_error(error, name) from None

    def predict(self, slot: ModelSlot, pixels: np.ndarray, name: str, threshold: float | None) -> Prediction:
        """The model's verdict, or a 4xx: an image the model cannot take, a non-finite result."""
        size = f"{pixels.shape[1]}x{pixels.shape[0]} px"
        try:
            prediction = slot.predict(pixels, threshold)
        except ImageReadError as error:
            raise image_error(error, name) from None
        except DefectlensError as error:  # e.g. the model's region of interest is not in the image
            logger.info("model %s cannot inspect %r: %s", slot.name, clip(name, 120), error)
            raise ApiError(422, f"cannot inspect {clip(name)} ({size}) with model {slot.name!r}: "
                                f"{clip(error, 200)}") from None
        except (ValueError, RuntimeError, MemoryError):
            logger.warning("model %s failed on %r (%s)", slot.name, clip(name, 120), size, exc_info=True)
            raise ApiError(422, f"model {slot.name!r} cannot inspect {clip(name)} ({size}); nothing was stored") from None
        finite = math.isfinite(float(prediction.score)) and math.isfinite(float(prediction.threshold))
        if not finite or not np.isfinite(prediction.anomaly_map).all():
            logger.warning("model %s gave a non-finite result for %r", slot.name, clip(name, 120))
            raise ApiError(422, f"model {slot.name!r} gave a non-finite score for {clip(name)}; nothing was stored")
        return prediction

    async def inspect(self, upload: Upload) -> tuple[Inspection, bool]:
        """(the stored inspection, whether it was stored before under the same request key)."""
        if upload.request_key:
            existing = await run_in_threadpool(self.store.by_request_key, upload.request_key)
            if existing is not None:
                return self._replay(existing, upload), True
        return await self.queue.run(partial(self._inspect, upload))

    def _replay(self, existing: Inspection, upload: Upload) -> Inspection:
        if existing.image_sha256 != upload.sha256 or existing.model_name != upload.slot.name:
            raise ApiError(409, "this Idempotency-Key was already used for another image or model")
        return existing

    def _inspect(self, upload: Upload, job: Job) -> tuple[Inspection, bool]:
        """Decode, predict, store the files, then commit the row (on a worker thread); the row, and
        whether another request with the same key stored it first."""
        with self.budget.hold(header_pixels(upload.data), job):
            files, size, verdict = self._pictures(upload, job)
        job.commit()  # past this point the client gets this row, whatever the clock says
        new_id = uuid.uuid4().hex
        try:
            row = self.store.add(
                id=new_id, model_name=upload.slot.name, model_sha256=upload.slot.sha256, image_sha256=upload.sha256,
                image_name=clean_name(upload.name), width=size[1], height=size[0], **verdict,
                latency_ms=(time.perf_counter() - upload.started) * 1000.0, request_key=upload.request_key, **files,
            )
        except SQLAlchemyError:
            logger.exception("storing an inspection failed")
            raise ApiError(503, "the inspection log is unavailable; nothing was stored, try again") from None
        if row.id != new_id:
            return self._replay(row, upload), True
        self._check_drift(upload.slot)
        return row, False

    def monitor(self, slot: ModelSlot, window: int = monitor.DEFAULT_WINDOW) -> monitor.DriftReport:
        return slot.drift(self.store.recent_scores(slot.sha256, window))

    def _check_drift(self, slot: ModelSlot) -> None:
        """Every MONITOR_EVERY inspections of a model: the drift monitor, to the log when its status changes."""
        count = self._since_drift_check.get(slot.name, 0) + 1
        self._since_drift_check[slot.name] = count % MONITOR_EVERY
        if count < MONITOR_EVERY:
            return
        try:
            report = self.monitor(slot)
        except SQLAlchemyError:
            return
        before = self.drift_status.get(slot.name, "ok")
        self.drift_status[slot.name] = report.status
        if report.status == "drift" and before != "drift":
            logger.warning("drift monitor, model %s: %s", slot.name, "; ".join(report.alarms))
        elif report.status != "drift" and before == "drift":
            logger.info("drift monitor, model %s: back to %s", slot.name, report.status)

    def _pictures(self, upload: Upload, job: Job) -> tuple[dict[str, Any], tuple[int, int], dict[str, Any]]:
        """Decode and predict, then store the upload and the pictures: (file columns, (H, W), verdict
        columns). The decoded input is let go before the pictures are drawn."""
        pixels = self.decode(upload.data, upload.name)
        job.check()
        prediction = self.predict(upload.slot, pixels, upload.name, upload.threshold)
        job.check()
        size = (int(pixels.shape[0]), int(pixels.shape[1]))
        preview = pictures.preview_png(pixels, self.limits.max_picture_side)
        prepared = pixels if prediction.image is None else prediction.image
        del pixels
        drawn = pictures.draw(prepared, prediction.anomaly_map, prediction.mask, prepared,
                              float(prediction.threshold), self.limits.max_picture_side, preview=preview)
        verdict = verdict_columns(prediction)
        del prediction, prepared
        files = {
            "image_path": self.files.put(upload.data, image_extension(upload.data), upload.sha256),
            "preview_path": self.files.put(drawn.preview_png, "png"),
            "base_path": self.files.put(drawn.base_png, "png"),
            "heatmap_path": self.files.put(drawn.heatmap_png, "png"),
            "mask_path": self.files.put(drawn.mask_png, "png"),
            "map_path": self.files.put(drawn.map_npy, "npy"),
            "map_scale": drawn.map_scale,
        }
        return files, size, verdict

    # -- reading back
    def row(self, inspection_id: str) -> Inspection:
        row = None
        if INSPECTION_ID.match(inspection_id):
            try:
                row = self.store.get(inspection_id)
            except SQLAlchemyError:
                logger.exception("reading inspection %s failed", inspection_id)
                raise ApiError(503, "the inspection log is unavailable") from None
        if row is None:
            raise ApiError(404, f"no inspection with id {quoted(inspection_id, 40)}")
        return row

    def stored(self, row: Inspection, relative: str | None) -> bytes:
        path = self.files.path(relative) if relative else None
        if path is None or not path.is_file():
            raise ApiError(410, f"a file of inspection {row.id} is missing from the store")
        return path.read_bytes()

    def anomaly_map(self, row: Inspection) -> np.ndarray:
        return pictures.load_map(self.stored(row, row.map_path))

    def picture(self, row: Inspection, kind: Literal["heatmap", "mask"], threshold: float | None) -> bytes:
        """The stored heat map or mask, or (another threshold) one drawn from the stored map, cached."""
        if threshold is None or threshold == row.threshold:
            return self.stored(row, row.heatmap_path if kind == "heatmap" else row.mask_path)
        key = (row.id, kind, threshold)
        cached = self.cache.get(key)
        if isinstance(cached, bytes):
            return cached
        anomaly_map = self.anomaly_map(row)
        base = self.base_image(row, anomaly_map.shape) if kind == "heatmap" else None
        drawn = pictures.redraw(kind, anomaly_map, threshold, base)
        self.cache.put(key, drawn, len(drawn))
        return drawn

    def base_image(self, row: Inspection, shape: tuple[int, int]) -> np.ndarray:
        """The image a heat map is drawn on, at the map's size (a row before revision 0002: made
        once from the upload, then stored)."""
        if row.base_path:
            return pictures.decode_own_png(self.stored(row, row.base_path))
        pixels = self.decode(self.stored(row, row.image_path), row.image_name or row.id)
        slot = self.models.get(row.model_name)
        if slot is not None and slot.sha256 == row.model_sha256:
            pixels = slot.prepared(pixels)
        base = pictures.shrink(pixels, shape)
        row.base_path = self.files.put(pictures.preview_png(base, max(shape)), "png")
        self.store.set_files(row.id, base_path=row.base_path)
        return base

    def image_png(self, row: Inspection) -> bytes:
        """The input image as a PNG this service encoded (a row before revision 0002: made once, then stored)."""
        if row.preview_path:
            return self.stored(row, row.preview_path)
        pixels = self.decode(self.stored(row, row.image_path), row.image_name or row.id)
        data = pictures.preview_png(pixels, self.limits.max_picture_side)
        row.preview_path = self.files.put(data, "png")
        self.store.set_files(row.id, preview_path=row.preview_path)
        return data

    def close(self) -> None:
        self.queue.close()
        self.store.close()


# ---------------------------------------------------------------------------------- schemas
class InspectionOut(BaseModel):
    """One inspection. URLs are relative to the service root."""

    id: str
    model: str = Field(description="name of the model that judged the image")
    score: float = Field(description="image anomaly score (higher = more anomalous)")
    is_anomalous: bool = Field(description="the verdict is NOT OK")
    verdict: Literal["OK", "REVIEW", "NOT OK"] = Field(
        description="OK at or below the review threshold (or the threshold without one), NOT OK above the "
        "threshold, REVIEW between: an operator should look"
    )
    threshold: float = Field(description="the NOT OK threshold")
    review_threshold: float | None = Field(None, description="the REVIEW threshold (null: one threshold)")
    p_value: float | None = Field(None, description="how often a good part scores at least this (calibrated)")
    z_score: float | None = Field(None, description="the same in normal-quantile units: 3 is a 3-sigma event")
    reasons: list[str] = Field(default_factory=list, description="which threshold or inspection rule decided")
    defects: list[dict[str, Any]] = Field(default_factory=list, description="defect regions: area_px, bbox, peak, zone")
    review: Literal["good", "defect"] | None = Field(None, description="the newest operator review, if any")
    reviewed_by: str | None = None
    latency_ms: float = Field(
        description="server time (ms) from the upload received to the files stored: decoding, waiting for the "
        "model, inference, pictures; not the upload transfer"
    )
    created_at: datetime = Field(description="UTC time the inspection was stored")
    image_url: str
    heatmap_url: str
    mask_url: str
    image_name: str | None = Field(None, description="file name given by the client")
    width: int
    height: int
    map_scale: int = Field(1, description="the stored map and pictures are reduced by this factor (1 = full size)")
    model_sha256: str
    image_sha256: str

    @classmethod
    def of(cls, row: Inspection, review: Review | None = None) -> "InspectionOut":
        base = f"/v1/inspections/{row.id}"
        return cls(
            id=row.id, model=row.model_name, score=row.score, is_anomalous=row.is_anomalous,
            verdict=row.state, threshold=row.threshold, review_threshold=row.review_threshold, p_value=row.p_value,
            z_score=row.z_score, reasons=json.loads(row.reasons) if row.reasons else [],
            defects=json.loads(row.defects) if row.defects else [],
            review=None if review is None else review.decision, reviewed_by=None if review is None else review.operator,
            latency_ms=round(row.latency_ms, 3), created_at=row.created_at,
            image_url=f"{base}/image.png", heatmap_url=f"{base}/heatmap.png", mask_url=f"{base}/mask.png",
            image_name=row.image_name, width=row.width, height=row.height, map_scale=row.map_scale or 1,
            model_sha256=row.model_sha256, image_sha256=row.image_sha256,
        )


class InspectionList(BaseModel):
    items: list[InspectionOut]
    total: int = Field(description="inspections matching the filters (all pages)")
    limit: int
    offset: int


class ModelOut(BaseModel):
    name: str
    default: bool
    file: str = Field(description="the model file's name (no server path)")
    sha256: str
    method: str
    backbone: str
    image_size: list[int]
    threshold: float
    review_threshold: float | None = None
    library_version: str = ""


class ModelList(BaseModel):
    items: list[ModelOut]
    default: str


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    version: str
    auth_required: bool = Field(description="the /v1/ endpoints need an API token")
    models: list[str] | None = Field(None, description="null without a valid token when tokens are required")
    database: Literal["ok", "unreachable"]
    inspections: int | None
    queue: dict[str, int] | None = None


class WhoAmI(BaseModel):
    auth_required: bool
    role: Literal["read", "write"]


class MonitorList(BaseModel):
    items: list[dict[str, Any]] = Field(description="per model: status (ok / drift / insufficient data / no "
                                        "calibration), shares above the thresholds, KS, control chart, alarms")
    window: int


class ErrorOut(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 410, 413, 415, 422, 429, 503, 504)
}
PNG_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}, "description": "PNG image"}, **ERRORS}


# ---------------------------------------------------------------------------------- app
def create_app(service: InspectionService, security: SecurityConfig | None = None) -> FastAPI:
    """The FastAPI application around a ready `InspectionService` (`security`: tokens, hosts, origins)."""
    from defectlens.service import ui

    security = security or SecurityConfig()

    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        yield
        service.close()

    app = FastAPI(
        title="defectlens inspection service",
        version=__version__,
        description="Inspect part images for anomalies with defectlens models; every inspection is logged. "
        "With tokens configured, send `Authorization: Bearer TOKEN` (read: GET, write: POST).",
        lifespan=lifespan,
        docs_url=None if ui.LOCAL_SWAGGER else "/docs",
    )
    app.state.service = service
    app.state.security = security
    # Added innermost first: the request passes ErrorGuard, headers, hosts, origins, tokens, size.
    app.add_middleware(UploadLimit, max_upload_bytes=service.max_upload_bytes)
    app.add_middleware(AuthGuard, tokens=security.tokens)
    app.add_middleware(OriginGuard, allowed_origins=security.allowed_origins)
    if security.allowed_hosts is not None:
        app.add_middleware(HostGuard, allowed=security.allowed_hosts)
    app.add_middleware(ErrorGuard)
    app.add_middleware(SecurityHeaders)
    _add_error_handlers(app)
    _add_inspection_routes(app, service)
    _add_file_routes(app, service)
    _add_service_routes(app, service, security)
    _add_monitor_routes(app, service)
    add_review_routes(app, service)
    ui.install(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"detail": error.detail, **error.extra}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_message(error)}, status_code=422)


async def _read_upload(service: InspectionService, image: UploadFile | str | None, name: str) -> bytes:
    if image is None or isinstance(image, str):
        raise ApiError(422, "send the image as a multipart/form-data file field named 'image'")
    data = await image.read(service.max_upload_bytes + 1)
    if len(data) > service.max_upload_bytes:
        raise ApiError(413, f"{clip(name)} is larger than the limit of {megabytes(service.max_upload_bytes)} "
                            "(--max-upload-mb)")
    if not data:
        raise ApiError(400, f"the uploaded file {quoted(name)} is empty (0 bytes)")
    return data


def _request_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not REQUEST_KEY.match(value):
        raise ApiError(422, "Idempotency-Key must be 1 to 64 printable ASCII characters without spaces")
    return value


def _add_inspection_routes(app: FastAPI, service: InspectionService) -> None:
    @app.post("/v1/inspect", response_model=InspectionOut, responses=ERRORS, tags=["inspections"])
    async def inspect(
        response: Response,
        image: UploadFile | None = File(None, description="the part image (PNG, JPEG, TIFF, BMP, WebP)"),
        model: str | None = Form(None, description="model name (default: the first model given)"),
        threshold: str | None = Form(None, description="decision threshold (default: the model's)"),
        idempotency_key: str | None = Header(None, description="a retry with the same key returns the stored "
                                             "inspection instead of storing it again"),
    ) -> InspectionOut:
        """Judge one image; the result, the image, heat map, mask and anomaly map are stored."""
        started = time.perf_counter()
        name = clean_name(getattr(image, "filename", None) or "upload")
        slot = service.model(model)
        upload = Upload(slot, await _read_upload(service, image, name), name, parse_threshold(threshold),
                        _request_key(idempotency_key), started)
        row, replayed = await service.inspect(upload)
        if replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return InspectionOut.of(row)

    @app.get("/v1/inspections", response_model=InspectionList, responses=ERRORS, tags=["inspections"])
    async def list_inspections(
        limit: int = Query(50, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=MAX_OFFSET, description=f"at most {MAX_OFFSET:,}; narrow with since/until"),
        model: str | None = Query(None, max_length=128, pattern=MODEL_NAME.pattern, description="only this model's"),
        verdict: Literal["ok", "review", "not_ok", "OK", "REVIEW", "NOT OK", "NOT_OK"] | None = Query(None),
        is_anomalous: bool | None = Query(None, description="same as verdict (true = NOT OK)"),
        since: datetime | None = Query(None, description="ISO 8601, inclusive (no zone = UTC)"),
        until: datetime | None = Query(None, description="ISO 8601, exclusive (no zone = UTC)"),
    ) -> InspectionList:
        """Inspections, newest first."""
        query = _inspection_query(limit, offset, model, verdict, is_anomalous, since, until)
        try:
            rows, total = await run_in_threadpool(service.store.list, query)
        except SQLAlchemyError:
            logger.exception("listing inspections failed")
            raise ApiError(503, "the inspection log is unavailable") from None
        reviews = await run_in_threadpool(service.store.latest_reviews, [row.id for row in rows])
        items = [InspectionOut.of(row, reviews.get(row.id)) for row in rows]
        return InspectionList(items=items, total=total, limit=limit, offset=offset)

    @app.get("/v1/inspections/{inspection_id}", response_model=InspectionOut, responses=ERRORS, tags=["inspections"])
    async def get_inspection(inspection_id: str) -> InspectionOut:
        row = await run_in_threadpool(service.row, inspection_id)
        reviews = await run_in_threadpool(service.store.latest_reviews, [row.id])
        return InspectionOut.of(row, reviews.get(row.id))


def _inspection_query(limit: int, offset: int, model: str | None, verdict: str | None, is_anomalous: bool | None,
                      since: datetime | None, until: datetime | None) -> InspectionQuery:
    from defectlens.service.store import as_utc

    state = None
    if verdict is not None:
        state = verdict.upper().replace("_", " ")
        wanted = state == "NOT OK"
        if is_anomalous is not None and is_anomalous != wanted:
            raise ApiError(422, f"verdict={quoted(verdict)} contradicts is_anomalous={is_anomalous}")
    try:
        since_utc, until_utc = (None if t is None else as_utc(t) for t in (since, until))
    except ValueError as error:
        raise ApiError(422, f"since/until: {clip(error, 120)}") from None
    if since_utc is not None and until_utc is not None and until_utc <= since_utc:
        raise ApiError(422, f"until ({until_utc.isoformat()}) must be after since ({since_utc.isoformat()})")
    return InspectionQuery(limit, offset, model, is_anomalous, state, since_utc, until_utc)


def _png(content: bytes, security: SecurityConfig) -> Response:
    cache = "private" if security.auth_required else "public"
    return Response(content, media_type="image/png", headers={"Cache-Control": f"{cache}, max-age=31536000, immutable"})


def _add_file_routes(app: FastAPI, service: InspectionService) -> None:
    security: SecurityConfig = app.state.security

    @app.get("/v1/inspections/{inspection_id}/image.png", response_class=Response, responses=PNG_RESPONSES, tags=["files"])
    async def inspection_image(inspection_id: str) -> Response:
        """The input image, re-encoded as PNG by the service (the upload's own bytes are never served)."""
        row = await run_in_threadpool(service.row, inspection_id)
        return _png(await run_in_threadpool(service.image_png, row), security)

    for kind, note in (("heatmap", "re-render at this threshold"), ("mask", "re-threshold the stored anomaly map")):
        _add_picture_route(app, service, kind, note)


def _add_picture_route(app: FastAPI, service: InspectionService, kind: Literal["heatmap", "mask"], note: str) -> None:
    security: SecurityConfig = app.state.security

    async def picture(inspection_id: str, threshold: str | None = Query(None, max_length=64, description=note)) -> Response:
        row = await run_in_threadpool(service.row, inspection_id)
        return _png(await run_in_threadpool(service.picture, row, kind, parse_threshold(threshold)), security)

    app.add_api_route(
        f"/v1/inspections/{{inspection_id}}/{kind}.png", picture, methods=["GET"], response_class=Response,
        responses=PNG_RESPONSES, tags=["files"], name=f"inspection_{kind}",
    )


def _add_service_routes(app: FastAPI, service: InspectionService, security: SecurityConfig) -> None:
    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, tags=["service"])
    async def list_models() -> ModelList:
        items = [ModelOut(**slot.info(name == service.default_model)) for name, slot in service.models.items()]
        return ModelList(items=items, default=service.default_model)

    @app.get("/v1/whoami", response_model=WhoAmI, responses=ERRORS, tags=["service"])
    async def whoami(request: Request) -> WhoAmI:
        """The role of the token sent (401 without a valid one when tokens are required)."""
        return WhoAmI(auth_required=security.auth_required, role=request.state.role)

    @app.get("/health", response_model=HealthOut, tags=["service"])
    async def health(request: Request) -> JSONResponse:
        """Liveness for load balancers (no token needed); models and counts only for a valid token."""
        reachable = await run_in_threadpool(service.store.ping)
        trusted = getattr(request.state, "role", None) is not None
        count = await run_in_threadpool(service.store.count) if reachable and trusted else None
        stats = service.queue.stats()
        body = HealthOut(
            status="ok" if reachable else "degraded", version=__version__, auth_required=security.auth_required,
            models=list(service.models) if trusted else None, database="ok" if reachable else "unreachable",
            inspections=count,
            queue={"workers": stats.workers, "capacity": stats.capacity, "admitted": stats.admitted,
                   "running": stats.running, "abandoned_running": stats.abandoned_running} if trusted else None,
        )
        return JSONResponse(body.model_dump(), status_code=200 if reachable else 503)


def _add_monitor_routes(app: FastAPI, service: InspectionService) -> None:
    @app.get("/v1/monitor", response_model=MonitorList, responses=ERRORS, tags=["service"])
    async def drift_monitor(
        model: str | None = Query(None, max_length=128, pattern=MODEL_NAME.pattern, description="only this model"),
        window: int = Query(monitor.DEFAULT_WINDOW, ge=monitor.MIN_WINDOW, le=10_000, description="recent scores"),
    ) -> MonitorList:
        """Per served model: its newest `window` scores against its calibration scores (drift warning)."""
        slots = [service.model(model)] if model else list(service.models.values())
        try:
            reports = [await run_in_threadpool(service.monitor, slot, window) for slot in slots]
        except SQLAlchemyError:
            logger.exception("reading recent scores failed")
            raise ApiError(503, "the inspection log is unavailable") from None
        return MonitorList(items=[report.to_dict() for report in reports], window=window)


def build_service(
    models: Sequence[str | tuple[str, str | Path]] | dict[str, ModelSlot],
    store_dir: str | Path = "inspection-store",
    db_url: str | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    limits: ServiceLimits | None = None,
) -> InspectionService:
    """Load models, open (create, migrate) the database and the file store; cheap checks come first.
    `limits` (its upload size replaced by `max_upload_mb`) bounds what a request may cost."""
    if not (max_upload_mb > 0):
        raise ConfigError(f"--max-upload-mb must be > 0, got {max_upload_mb}")
    from dataclasses import replace

    limits = replace(limits or ServiceLimits(), max_upload_bytes=int(max_upload_mb * 1024 * 1024))
    limits.decode_limits()
    InspectionQueue(limits.workers, limits.queue, limits.timeout_s).close()  # option check before loading models
    if db_url is not None:
        check_db_url(db_url)
    if not isinstance(models, dict):
        parse_model_specs(models)
    slots = models if isinstance(models, dict) else load_models(models)
    files = FileStore(store_dir)
    store = InspectionStore(db_url or default_db_url(store_dir))
    return InspectionService(slots, store, files, limits)


def build_app(
    models: Sequence[str | tuple[str, str | Path]] | dict[str, ModelSlot],
    store_dir: str | Path = "inspection-store",
    db_url: str | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    limits: ServiceLimits | None = None,
    security: SecurityConfig | None = None,
) -> FastAPI:
    """`create_app(build_service(...), security)`: the app for uvicorn, TestClient or an ASGI server."""
    return create_app(build_service(models, store_dir, db_url, max_upload_mb, limits), security)

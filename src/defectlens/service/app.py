"""The inspection REST service (FastAPI): a thin layer over `Detector` and the inspection log.

    POST /v1/inspect                          multipart: image, [model], [threshold]
    GET  /v1/inspections                      ?limit&offset&model&verdict|is_anomalous&since&until
    GET  /v1/inspections/{id}                 one inspection
    GET  /v1/inspections/{id}/image.png       the input image
    GET  /v1/inspections/{id}/heatmap.png     heat-map overlay        [?threshold=T re-renders]
    GET  /v1/inspections/{id}/mask.png        defect mask             [?threshold=T re-thresholds]
    GET  /v1/models, GET /health, GET / (operator UI), GET /docs (OpenAPI)

Models are loaded once, before the server starts. Decoding, inference and file writing run in
worker threads (one lock per model, so a model's forward passes never overlap) and the event
loop keeps serving. Every accepted inspection is stored - files first, then the database row.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Sequence

import cv2
import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from defectlens._version import __version__
from defectlens.data.images import decode_image_bytes
from defectlens.detector import Detector, Prediction
from defectlens.errors import ConfigError, DefectlensError, ImageReadError, ImageTooLargeError
from defectlens.hashing import file_sha256, sha256_hex
from defectlens.outputs import encode_png, heatmap_png, mask_png, render
from defectlens.service.store import FileStore, Inspection, InspectionQuery, InspectionStore, check_db_url, default_db_url

logger = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
DEFAULT_MAX_UPLOAD_MB = 20.0
INSPECTIONS_IN_FLIGHT_PER_MODEL = 3
MULTIPART_SLACK = 64 * 1024  # form fields and boundaries around the image in a request body
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")  # PIL names its BytesIO; drop it
IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}


# ---------------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error answered as JSON: {"detail": message, **extra} with the given status."""

    def __init__(self, status_code: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.extra = extra


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item.get("loc", ()) if part not in ("body", "query", "path"))
        if location == "image":
            parts.append("send the image as a multipart/form-data file field named 'image' (it came as a text field)")
            continue
        message = item.get("msg", "invalid value")
        value = item.get("input")
        shown = f" (got {value!r})" if value is not None and not isinstance(value, (dict, list)) else ""
        parts.append(f"{location or 'request'}: {message}{shown}")
    return "; ".join(parts) or "invalid request"


def parse_threshold(value: str | float | None, where: str = "threshold") -> float | None:
    """None, or a finite number >= 0; ApiError(422) otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ApiError(422, f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ApiError(422, f"{where} must be a finite number >= 0, got {value!r}")
    return number


def _megabytes(size: int) -> str:
    return f"{size / 1048576:.4g} MB"


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

    def info(self, default: bool = False) -> dict[str, Any]:
        detector = self.detector
        return {
            "name": self.name,
            "default": default,
            "file": str(self.path),
            "sha256": self.sha256,
            "method": detector.method_name,
            "backbone": detector.backbone,
            "image_size": list(detector.image_size),
            "threshold": float(detector.threshold or 0.0),
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
    """Load every model once; ModelFileError (naming the file) if one is missing or broken.

    All files are read before any is warmed up (`warm_up`: build the backbone and run one blank
    image, so that the first request is not slow).
    """
    slots: dict[str, ModelSlot] = {}
    for name, path in parse_model_specs(specs).items():
        detector = Detector.load(path)
        slots[name] = ModelSlot(name=name, path=path.resolve(), sha256=file_sha256(path), detector=detector)
    for name, slot in slots.items():
        if warm_up:
            slot.warm_up()
        logger.info("model %s loaded from %s (threshold %.4g)", name, slot.path, slot.detector.threshold)
    return slots


# ---------------------------------------------------------------------------------- pictures
def image_extension(data: bytes) -> str:
    """File extension from the magic bytes (the original upload is stored verbatim)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tif"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "img"


# ---------------------------------------------------------------------------------- service
class InspectionService:
    """Inspect images with the loaded models and keep the log (no HTTP in here)."""

    def __init__(
        self,
        models: dict[str, ModelSlot],
        store: InspectionStore,
        files: FileStore,
        max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1024 * 1024),
    ) -> None:
        if not models:
            raise ConfigError("the service needs at least one model")
        self.models = models
        self.default_model = next(iter(models))
        self.store = store
        self.files = files
        self.max_upload_bytes = int(max_upload_bytes)
        # Decoded images are far larger than uploads: at most this many are in memory at once
        # (the others wait as raw bytes). One runs the model; the rest decode, draw or store.
        self._in_flight = threading.BoundedSemaphore(INSPECTIONS_IN_FLIGHT_PER_MODEL * len(models))

    def model(self, name: str | None) -> ModelSlot:
        name = name.strip() if name else None
        slot = self.models.get(name or self.default_model)
        if slot is None:
            available = sorted(self.models)
            raise ApiError(404, f"unknown model {name!r}; available models: {', '.join(available)}", models=available)
        return slot

    def decode(self, data: bytes, name: str) -> np.ndarray:
        try:
            return decode_image_bytes(data, name)
        except ImageTooLargeError as error:
            raise ApiError(413, _OBJECT_REPR.sub("", str(error))) from None
        except ImageReadError as error:
            raise ApiError(415, _OBJECT_REPR.sub("", str(error))) from None

    def inspect(self, slot: ModelSlot, data: bytes, name: str, threshold: float | None, started: float) -> Inspection:
        """Decode, predict, store the files, then commit the row (runs in a worker thread)."""
        with self._in_flight:
            return self._inspect(slot, data, name, threshold, started)

    def _inspect(self, slot: ModelSlot, data: bytes, name: str, threshold: float | None, started: float) -> Inspection:
        pixels = self.decode(data, name)
        try:
            prediction = slot.predict(pixels, threshold)
        except ImageReadError as error:
            raise ApiError(415, _OBJECT_REPR.sub("", str(error))) from None
        except DefectlensError as error:  # e.g. the model's region of interest is not in the image
            raise ApiError(422, f"cannot inspect {name} with model {slot.name!r}: {error}") from None
        rendered = render(prediction)  # drawn on the prepared image the model scored
        image_sha = sha256_hex(data)
        image_path = self.files.put(data, image_extension(data), image_sha)
        heatmap_path = self.files.put(rendered.heatmap_png, "png")
        mask_path = self.files.put(rendered.mask_png, "png")
        map_path = self.files.put(rendered.map_npy, "npy")
        return self.store.add(
            model_name=slot.name,
            model_sha256=slot.sha256,
            image_sha256=image_sha,
            image_name=(name or None) and name[-255:],
            width=int(pixels.shape[1]),
            height=int(pixels.shape[0]),
            score=float(prediction.score),
            threshold=float(prediction.threshold),
            is_anomalous=bool(prediction.is_anomalous),
            latency_ms=(time.perf_counter() - started) * 1000.0,
            image_path=image_path,
            heatmap_path=heatmap_path,
            mask_path=mask_path,
            map_path=map_path,
        )

    # -- reading back
    def row(self, inspection_id: str) -> Inspection:
        row = self.store.get(inspection_id) if len(inspection_id) <= 64 else None
        if row is None:
            raise ApiError(404, f"no inspection with id {inspection_id!r}")
        return row

    def stored_file(self, row: Inspection, relative: str) -> Path:
        path = self.files.path(relative)
        if not path.is_file():
            raise ApiError(410, f"the file {relative} of inspection {row.id} is missing from the store {self.files.root}")
        return path

    def anomaly_map(self, row: Inspection) -> np.ndarray:
        return np.load(self.stored_file(row, row.map_path), allow_pickle=False).astype(np.float32)

    def picture(self, row: Inspection, kind: Literal["heatmap", "mask"], threshold: float | None) -> bytes | Path:
        """The stored heat map or mask, or (another threshold) one drawn again from the stored map."""
        if threshold is None or threshold == row.threshold:
            return self.stored_file(row, row.heatmap_path if kind == "heatmap" else row.mask_path)
        anomaly_map = self.anomaly_map(row)
        if kind == "mask":
            return mask_png(anomaly_map, threshold)
        pixels = decode_image_bytes(self.stored_file(row, row.image_path).read_bytes(), row.image_name or row.id)
        if anomaly_map.shape != pixels.shape[:2]:
            slot = self.models.get(row.model_name)
            if slot is not None and slot.sha256 == row.model_sha256:
                pixels = slot.prepared(pixels)
            if anomaly_map.shape != pixels.shape[:2]:
                pixels = cv2.resize(pixels, anomaly_map.shape[::-1], interpolation=cv2.INTER_AREA)
        return heatmap_png(pixels, anomaly_map, threshold)

    def image_png(self, row: Inspection) -> bytes | Path:
        path = self.stored_file(row, row.image_path)
        if path.suffix == ".png":
            return path
        pixels = decode_image_bytes(path.read_bytes(), row.image_name or row.id)
        return encode_png((np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8))


# ---------------------------------------------------------------------------------- schemas
class InspectionOut(BaseModel):
    """One inspection. URLs are relative to the service root."""

    id: str
    model: str = Field(description="name of the model that judged the image")
    score: float = Field(description="image anomaly score (higher = more anomalous)")
    is_anomalous: bool = Field(description="score > threshold")
    verdict: Literal["OK", "NOT OK"]
    threshold: float
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
    model_sha256: str
    image_sha256: str

    @classmethod
    def of(cls, row: Inspection) -> "InspectionOut":
        base = f"/v1/inspections/{row.id}"
        return cls(
            id=row.id,
            model=row.model_name,
            score=row.score,
            is_anomalous=row.is_anomalous,
            verdict="NOT OK" if row.is_anomalous else "OK",
            threshold=row.threshold,
            latency_ms=round(row.latency_ms, 3),
            created_at=row.created_at,
            image_url=f"{base}/image.png",
            heatmap_url=f"{base}/heatmap.png",
            mask_url=f"{base}/mask.png",
            image_name=row.image_name,
            width=row.width,
            height=row.height,
            model_sha256=row.model_sha256,
            image_sha256=row.image_sha256,
        )


class InspectionList(BaseModel):
    items: list[InspectionOut]
    total: int = Field(description="inspections matching the filters (all pages)")
    limit: int
    offset: int


class ModelOut(BaseModel):
    name: str
    default: bool
    file: str
    sha256: str
    method: str
    backbone: str
    image_size: list[int]
    threshold: float
    library_version: str = ""


class ModelList(BaseModel):
    items: list[ModelOut]
    default: str


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    version: str
    models: list[str]
    database: Literal["ok", "unreachable"]
    inspections: int | None


class ErrorOut(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 404, 410, 413, 415, 422)
}


# ---------------------------------------------------------------------------------- middleware
class UploadLimit:
    """Answers 413 before reading a body whose declared (or streamed) size is over the limit."""

    def __init__(self, app: ASGIApp, max_upload_bytes: int, slack: int = MULTIPART_SLACK) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_body_bytes = max_upload_bytes + slack

    def _message(self) -> str:
        return f"the upload is larger than the limit of {_megabytes(self.max_upload_bytes)} (--max-upload-mb)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            response = JSONResponse({"detail": self._message()}, status_code=413, headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)


# ---------------------------------------------------------------------------------- app
def create_app(service: InspectionService) -> FastAPI:
    """The FastAPI application around a ready `InspectionService`."""
    from defectlens.service import ui

    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        yield
        service.store.close()

    app = FastAPI(
        title="defectlens inspection service",
        version=__version__,
        description="Inspect part images for anomalies with defectlens models; every inspection is logged.",
        lifespan=lifespan,
        docs_url=None if ui.LOCAL_SWAGGER else "/docs",
    )
    app.state.service = service
    app.add_middleware(UploadLimit, max_upload_bytes=service.max_upload_bytes)
    _add_error_handlers(app)
    _add_inspection_routes(app, service)
    _add_file_routes(app, service)
    _add_service_routes(app, service)
    ui.install(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"detail": error.detail, **error.extra}, status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(error)}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {error.__class__.__name__}: {error}"}, status_code=500)


def _add_inspection_routes(app: FastAPI, service: InspectionService) -> None:
    @app.post("/v1/inspect", response_model=InspectionOut, responses=ERRORS, tags=["inspections"])
    async def inspect(
        image: UploadFile | None = File(None, description="the part image (PNG, JPEG, TIFF, BMP, WebP)"),
        model: str | None = Form(None, description="model name (default: the first model given)"),
        threshold: str | None = Form(None, description="decision threshold (default: the model's)"),
    ) -> InspectionOut:
        """Judge one image; the result, the image, heat map, mask and anomaly map are stored."""
        if image is None or isinstance(image, str):
            raise ApiError(422, "send the image as a multipart/form-data file field named 'image'")
        started = time.perf_counter()
        name = image.filename or "upload"
        slot = service.model(model)
        decision = parse_threshold(threshold)
        data = await image.read(service.max_upload_bytes + 1)
        if len(data) > service.max_upload_bytes:
            raise ApiError(413, f"{name} is larger than the limit of {_megabytes(service.max_upload_bytes)} (--max-upload-mb)")
        if not data:
            raise ApiError(400, f"the uploaded file {name!r} is empty (0 bytes)")
        row = await run_in_threadpool(service.inspect, slot, data, name, decision, started)
        return InspectionOut.of(row)

    @app.get("/v1/inspections", response_model=InspectionList, responses=ERRORS, tags=["inspections"])
    async def list_inspections(
        limit: int = Query(50, ge=1, le=1000),
        offset: int = Query(0, ge=0),
        model: str | None = Query(None, description="only this model's inspections"),
        verdict: Literal["ok", "not_ok", "OK", "NOT OK", "NOT_OK"] | None = Query(None),
        is_anomalous: bool | None = Query(None, description="same as verdict (true = NOT OK)"),
        since: datetime | None = Query(None, description="ISO 8601, inclusive (no zone = UTC)"),
        until: datetime | None = Query(None, description="ISO 8601, exclusive (no zone = UTC)"),
    ) -> InspectionList:
        """Inspections, newest first."""
        if verdict is not None:
            wanted = verdict.upper().replace(" ", "_") == "NOT_OK"
            if is_anomalous is not None and is_anomalous != wanted:
                raise ApiError(422, f"verdict={verdict!r} contradicts is_anomalous={is_anomalous}")
            is_anomalous = wanted
        if since is not None and until is not None and until <= since:
            raise ApiError(422, f"until ({until.isoformat()}) must be after since ({since.isoformat()})")
        query = InspectionQuery(limit, offset, model, is_anomalous, since, until)
        rows, total = await run_in_threadpool(service.store.list, query)
        return InspectionList(items=[InspectionOut.of(row) for row in rows], total=total, limit=limit, offset=offset)

    @app.get("/v1/inspections/{inspection_id}", response_model=InspectionOut, responses=ERRORS, tags=["inspections"])
    async def get_inspection(inspection_id: str) -> InspectionOut:
        return InspectionOut.of(await run_in_threadpool(service.row, inspection_id))


def _png(content: bytes | Path) -> Response:
    if isinstance(content, Path):
        return FileResponse(content, media_type="image/png", headers=IMMUTABLE)
    return Response(content, media_type="image/png", headers=IMMUTABLE)


PNG_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}, "description": "PNG image"}, **ERRORS}


def _add_file_routes(app: FastAPI, service: InspectionService) -> None:
    @app.get("/v1/inspections/{inspection_id}/image.png", response_class=Response, responses=PNG_RESPONSES, tags=["files"])
    async def inspection_image(inspection_id: str) -> Response:
        row = await run_in_threadpool(service.row, inspection_id)
        return _png(await run_in_threadpool(service.image_png, row))

    for kind, note in (("heatmap", "re-render at this threshold"), ("mask", "re-threshold the stored anomaly map")):
        _add_picture_route(app, service, kind, note)


def _add_picture_route(app: FastAPI, service: InspectionService, kind: Literal["heatmap", "mask"], note: str) -> None:
    async def picture(inspection_id: str, threshold: str | None = Query(None, description=note)) -> Response:
        row = await run_in_threadpool(service.row, inspection_id)
        return _png(await run_in_threadpool(service.picture, row, kind, parse_threshold(threshold)))

    app.add_api_route(
        f"/v1/inspections/{{inspection_id}}/{kind}.png", picture, methods=["GET"], response_class=Response,
        responses=PNG_RESPONSES, tags=["files"], name=f"inspection_{kind}",
    )


def _add_service_routes(app: FastAPI, service: InspectionService) -> None:
    @app.get("/v1/models", response_model=ModelList, tags=["service"])
    async def list_models() -> ModelList:
        items = [ModelOut(**slot.info(name == service.default_model)) for name, slot in service.models.items()]
        return ModelList(items=items, default=service.default_model)

    @app.get("/health", response_model=HealthOut, tags=["service"])
    async def health() -> JSONResponse:
        reachable = await run_in_threadpool(service.store.ping)
        count = await run_in_threadpool(service.store.count) if reachable else None
        body = HealthOut(
            status="ok" if reachable else "degraded",
            version=__version__,
            models=list(service.models),
            database="ok" if reachable else "unreachable",
            inspections=count,
        )
        return JSONResponse(body.model_dump(), status_code=200 if reachable else 503)


def build_service(
    models: Sequence[str | tuple[str, str | Path]] | dict[str, ModelSlot],
    store_dir: str | Path = "inspection-store",
    db_url: str | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
) -> InspectionService:
    """Load models, open (and create) the database and the file store; cheap checks come first."""
    if not (max_upload_mb > 0):
        raise ConfigError(f"--max-upload-mb must be > 0, got {max_upload_mb}")
    if db_url is not None:
        check_db_url(db_url)
    if not isinstance(models, dict):
        parse_model_specs(models)
    slots = models if isinstance(models, dict) else load_models(models)
    files = FileStore(store_dir)
    store = InspectionStore(db_url or default_db_url(store_dir))
    return InspectionService(slots, store, files, int(max_upload_mb * 1024 * 1024))


def build_app(
    models: Sequence[str | tuple[str, str | Path]] | dict[str, ModelSlot],
    store_dir: str | Path = "inspection-store",
    db_url: str | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
) -> FastAPI:
    """`create_app(build_service(...))`: the app for uvicorn, TestClient or an ASGI server."""
    return create_app(build_service(models, store_dir, db_url, max_upload_mb))

"""The operator review loop: an operator marks an inspection "good" (good after review) or
"defect" (defect confirmed); every decision is stored with who, when, the image hash, the model
name / hash / library version, the thresholds, the rules and the operator's note (`store.Review`).
An inspection may be reviewed again; the newest review counts.

Reviewed-good images go back into the model: `export_reviewed` copies the stored uploads whose
newest review is "good" into a folder (plus ``reviewed.json``, the audit of each), which
``defectlens recalibrate MODEL --good DIR`` (new thresholds, no refit) or ``fit`` reads.

    POST /v1/inspections/{id}/review     JSON {decision: good|defect, operator, note}   (write token)
    GET  /v1/inspections/{id}/reviews    the audit trail, oldest first                   (read token)
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from defectlens.errors import ConfigError
from defectlens.service.errors import ApiError
from defectlens.service.store import FileStore, InspectionStore, Review

if TYPE_CHECKING:
    from defectlens.service.app import InspectionService

DECISIONS = ("good", "defect")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
MANIFEST = "reviewed.json"


class ReviewIn(BaseModel):
    decision: Literal["good", "defect"] = Field(description="good: good after review; defect: defect confirmed")
    operator: str = Field(min_length=1, max_length=128, description="who decided (name or badge id)")
    note: str = Field("", max_length=1000, description="the operator's note")


class ReviewOut(BaseModel):
    id: int
    inspection_id: str
    created_at: datetime
    decision: Literal["good", "defect"]
    operator: str
    role: str | None = Field(None, description="the role of the token the decision was sent with")
    note: str | None
    verdict: str = Field(description="the service's verdict that was reviewed")
    score: float
    threshold: float
    review_threshold: float | None
    image_sha256: str
    model_name: str
    model_sha256: str
    model_library_version: str | None

    @classmethod
    def of(cls, row: Review) -> "ReviewOut":
        fields = {name: value for name, value in row.as_dict().items() if name in cls.model_fields}
        return cls(**fields)


class ReviewList(BaseModel):
    items: list[ReviewOut]


def _clean(text: str) -> str:
    return _CONTROL.sub(" ", text).strip()


def review_fields(service: "InspectionService", inspection_id: str, body: ReviewIn, role: str | None) -> dict[str, Any]:
    """The review row's columns: the decision, and the audit copied from the inspection and its model."""
    row = service.row(inspection_id)
    operator = _clean(body.operator)
    if not operator:
        raise ApiError(422, "operator must name who decided")
    slot = next((slot for slot in service.models.values() if slot.sha256 == row.model_sha256), None)
    version = slot.info() if slot is not None else {}
    return {
        "inspection_id": row.id, "decision": body.decision, "operator": operator, "role": role,
        "note": _clean(body.note) or None, "image_sha256": row.image_sha256, "model_name": row.model_name,
        "model_sha256": row.model_sha256, "model_library_version": version.get("library_version") or None,
        "verdict": row.state, "score": row.score, "threshold": row.threshold, "review_threshold": row.review_threshold,
        "rules": None if slot is None else json.dumps(slot.detector.rules.to_dict()),
    }


def add_review_routes(app: FastAPI, service: "InspectionService") -> None:
    @app.post("/v1/inspections/{inspection_id}/review", response_model=ReviewOut, tags=["reviews"])
    async def review(inspection_id: str, body: ReviewIn, request: Request) -> ReviewOut:
        """Record an operator's decision on an inspection (audited; the newest decision counts)."""
        fields = await run_in_threadpool(review_fields, service, inspection_id, body, getattr(request.state, "role", None))
        try:
            row = await run_in_threadpool(lambda: service.store.add_review(**fields))
        except SQLAlchemyError:
            raise ApiError(503, "the inspection log is unavailable; the review was not stored") from None
        return ReviewOut.of(row)

    @app.get("/v1/inspections/{inspection_id}/reviews", response_model=ReviewList, tags=["reviews"])
    async def reviews(inspection_id: str) -> ReviewList:
        """Every decision on an inspection, oldest first."""
        row = await run_in_threadpool(service.row, inspection_id)
        return ReviewList(items=[ReviewOut.of(item) for item in await run_in_threadpool(service.store.reviews, row.id)])


def export_reviewed(store: InspectionStore, files: FileStore, out: str | Path, model: str | None = None,
                    decision: str = "good") -> list[Path]:
    """Copy the uploads whose newest review is `decision` into `out` (``<id>.<ext>``), with
    ``reviewed.json`` (one audit entry per image); returns the image paths. ConfigError when a
    stored file is missing (the store folder is not the log's) or nothing was reviewed so."""
    if decision not in DECISIONS:
        raise ConfigError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
    pairs = store.reviewed(decision, model)
    if not pairs:
        which = f" of model {model!r}" if model else ""
        raise ConfigError(f"no inspection{which} has a newest review of {decision!r} in {store.describe()}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written, manifest = [], []
    for inspection, review in pairs:
        source = files.path(inspection.image_path)
        if not source.is_file():
            raise ConfigError(f"the stored upload of inspection {inspection.id} is missing under {files.root} "
                              "(give the store folder the service used: --store)")
        target = folder / f"{inspection.id}{source.suffix}"
        shutil.copyfile(source, target)
        written.append(target)
        manifest.append({
            "file": target.name, "inspection_id": inspection.id, "image_name": inspection.image_name,
            "image_sha256": inspection.image_sha256, "inspected_at": inspection.created_at.isoformat(),
            "verdict": inspection.state, "score": inspection.score, "model_name": inspection.model_name,
            "model_sha256": inspection.model_sha256, "decision": review.decision, "operator": review.operator,
            "reviewed_at": review.created_at.isoformat(), "note": review.note,
        })
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return written

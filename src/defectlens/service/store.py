"""The inspection log: files on disk (content-addressed) and one database row per inspection.

Two parts, written in this order so that a crash never leaves a row pointing at missing files:

1. `FileStore` writes the input image, the heat-map overlay, the mask and the raw anomaly map
   under ``<root>/ab/cd/<sha256>.<ext>``, each through a temporary file, ``fsync`` and an atomic
   ``os.replace`` (then an ``fsync`` of the folder). The same bytes land in the same file, so
   a re-inspected image costs no extra disk.
2. `InspectionStore` commits the row (SQLAlchemy 2.0; SQLite by default in WAL mode with
   ``synchronous=FULL``, so a commit that returned survives a crash or a power cut).

A crash between 1 and 2 leaves only unreferenced files, never a dangling row.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Boolean, DateTime, Float, Index, Integer, String, create_engine, event, func, select, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from defectlens.errors import ConfigError
from defectlens.hashing import file_sha256, sha256_hex

def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime) -> datetime:
    """Aware UTC datetime; a naive one is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


# ---------------------------------------------------------------------------------- files
class FileStore:
    """Content-addressed files under one root folder, written atomically and durably.

    `put(data, ext)` returns the path relative to the root, ``ab/cd/<sha256>.<ext>``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot create the file store {self.root}: {error}") from None
        if not os.access(self.root, os.W_OK):
            raise ConfigError(f"the file store {self.root} is not writable")

    @staticmethod
    def relative_path(digest: str, ext: str) -> str:
        return f"{digest[:2]}/{digest[2:4]}/{digest}.{ext}"

    def put(self, data: bytes, ext: str, digest: str | None = None) -> str:
        """Store `data` (once) and return its relative path."""
        digest = digest or sha256_hex(data)
        relative = self.relative_path(digest, ext)
        target = self.root / relative
        if target.is_file() and target.stat().st_size == len(data):
            return relative
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{digest[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, target)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        _fsync_dir(target.parent)
        return relative

    def path(self, relative: str) -> Path:
        """Absolute path of a stored file; refuses anything that leaves the root."""
        candidate = (self.root / relative).resolve()
        if self.root not in candidate.parents:
            raise ValueError(f"{relative!r} is outside the file store")
        return candidate

    def exists(self, relative: str | None) -> bool:
        return bool(relative) and self.path(relative).is_file()  # type: ignore[arg-type]


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------------- database
class Base(DeclarativeBase):
    pass


class UTCDateTime(TypeDecorator):
    """Stores UTC without a zone (portable across SQLite / PostgreSQL / MySQL); reads back aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else as_utc(value).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Inspection(Base):
    """One inspected image. File paths are relative to the file store root."""

    __tablename__ = "inspections"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    model_name: Mapped[str] = mapped_column(String(128), nullable=False)
    model_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    image_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    image_name: Mapped[str | None] = mapped_column(String(255))
    width: Mapped[int] = mapped_column(Integer, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    score: Mapped[float] = mapped_column(Float, nullable=False)
    threshold: Mapped[float] = mapped_column(Float, nullable=False)
    is_anomalous: Mapped[bool] = mapped_column(Boolean, nullable=False)
    latency_ms: Mapped[float] = mapped_column(Float, nullable=False)
    image_path: Mapped[str] = mapped_column(String(160), nullable=False)
    heatmap_path: Mapped[str] = mapped_column(String(160), nullable=False)
    mask_path: Mapped[str] = mapped_column(String(160), nullable=False)
    map_path: Mapped[str] = mapped_column(String(160), nullable=False)

    __table_args__ = (
        Index("ix_inspections_created_at", "created_at"),
        Index("ix_inspections_model_created", "model_name", "created_at"),
        Index("ix_inspections_verdict_created", "is_anomalous", "created_at"),
    )

    def as_dict(self) -> dict[str, Any]:
        return {column.name: getattr(self, column.name) for column in self.__table__.columns}


@dataclass
class InspectionQuery:
    """Filters and page of `InspectionStore.list`; `since` inclusive, `until` exclusive."""

    limit: int = 50
    offset: int = 0
    model: str | None = None
    is_anomalous: bool | None = None
    since: datetime | None = None
    until: datetime | None = None


def default_db_url(store_root: str | Path) -> str:
    return f"sqlite:///{Path(store_root).resolve() / 'inspections.db'}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is synced at every commit, so an acknowledged inspection survives a
        # power cut too (NORMAL would only survive an application crash).
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
    finally:
        cursor.close()


def check_db_url(url: str) -> URL:
    """The parsed URL, or ConfigError naming it."""
    try:
        return make_url(url)
    except ArgumentError as error:
        raise ConfigError(f"--db {url!r} is not a database URL ({error})") from None


class InspectionStore:
    """The inspection log in any SQLAlchemy database; thread-safe (one engine, short sessions)."""

    def __init__(self, url: str) -> None:
        parsed = check_db_url(url)
        options: dict[str, Any] = {"pool_pre_ping": True}
        if parsed.get_backend_name() == "sqlite":
            options["connect_args"] = {"check_same_thread": False, "timeout": 30}
            database = parsed.database
            if database in (None, "", ":memory:"):
                options["poolclass"] = StaticPool  # one shared in-memory database
            else:
                Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        self.url = parsed
        try:
            self.engine: Engine = create_engine(parsed, **options)
        except (ArgumentError, ImportError) as error:
            raise ConfigError(f"cannot open database {parsed.render_as_string(hide_password=True)}: {error}") from None
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError as error:
            raise ConfigError(
                f"cannot open database {parsed.render_as_string(hide_password=True)}: {error.__class__.__name__}: {error}"
            ) from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def describe(self) -> str:
        return self.url.render_as_string(hide_password=True)

    def add(self, **fields: Any) -> Inspection:
        """Insert one inspection (id and created_at filled in when absent) and commit."""
        fields.setdefault("id", uuid.uuid4().hex)
        fields.setdefault("created_at", utc_now())
        row = Inspection(**fields)
        with self._sessions.begin() as session:
            session.add(row)
        return row

    def get(self, inspection_id: str) -> Inspection | None:
        with self._sessions() as session:
            return session.get(Inspection, inspection_id)

    def list(self, query: InspectionQuery) -> tuple[list[Inspection], int]:
        """One page of inspections, newest first, and the number matching the filters."""
        conditions = []
        if query.model is not None:
            conditions.append(Inspection.model_name == query.model)
        if query.is_anomalous is not None:
            conditions.append(Inspection.is_anomalous == query.is_anomalous)
        if query.since is not None:
            conditions.append(Inspection.created_at >= as_utc(query.since))
        if query.until is not None:
            conditions.append(Inspection.created_at < as_utc(query.until))
        with self._sessions() as session:
            total = session.scalar(select(func.count()).select_from(Inspection).where(*conditions)) or 0
            rows = session.scalars(
                select(Inspection)
                .where(*conditions)
                .order_by(Inspection.created_at.desc(), Inspection.id.desc())
                .limit(query.limit)
                .offset(query.offset)
            ).all()
        return list(rows), int(total)

    def count(self) -> int:
        with self._sessions() as session:
            return int(session.scalar(select(func.count()).select_from(Inspection)) or 0)

    def model_names(self) -> list[str]:
        with self._sessions() as session:
            return list(session.scalars(select(Inspection.model_name).distinct().order_by(Inspection.model_name)))

    def ping(self) -> bool:
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except SQLAlchemyError:
            return False

    def close(self) -> None:
        self.engine.dispose()


__all__ = (
    "FileStore",
    "Inspection",
    "InspectionQuery",
    "InspectionStore",
    "default_db_url",
    "file_sha256",
    "sha256_hex",
    "utc_now",
)

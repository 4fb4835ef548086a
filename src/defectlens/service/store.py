"""The inspection log: files on disk (content-addressed) and one database row per inspection.

Two parts, written in this order so that a crash never leaves a row pointing at missing files:

1. `FileStore` writes the input image, the heat-map overlay, the mask and the raw anomaly map
   under ``<root>/ab/cd/<sha256>.<ext>``, each through a temporary file, ``fsync`` and an atomic
   ``os.replace`` (then an ``fsync`` of the folder). The same bytes land in the same file, so
   a re-inspected image costs no extra disk.
2. `InspectionStore` commits the row (SQLAlchemy 2.0; SQLite by default in WAL mode with
   ``synchronous=FULL``, so a commit that returned survives a crash or a power cut;
   PostgreSQL with ``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB``, psycopg 3).

A crash between 1 and 2 leaves only unreferenced files, never a dangling row.

The schema is versioned with Alembic (``migrations/``): opening a store upgrades it in place
(`migrate`), so a log written by an older version keeps its rows. A row is refused (ValueError)
unless its score, threshold and latency are finite: a failed inspection never reaches the log.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, create_engine, event, func, inspect, select,
    text, update,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from defectlens.errors import ConfigError
from defectlens.hashing import file_sha256, sha256_hex

MIGRATIONS = Path(__file__).resolve().with_name("migrations")
FIRST_REVISION = "0001"  # the schema of stores created before migrations existed
_MIGRATION_LOCK = 0x64656C6E  # PostgreSQL advisory lock: one migrating process at a time


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime) -> datetime:
    """Aware UTC datetime; a naive one is taken to be UTC already. ValueError when the UTC
    time is outside the years 1..9999 (e.g. 0001-01-01T00:00+01:00)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    try:
        return moment.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError(f"{moment.isoformat()} is outside the representable UTC range") from None


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
    # revision 0002 (NULL in rows written before it)
    preview_path: Mapped[str | None] = mapped_column(String(160))
    base_path: Mapped[str | None] = mapped_column(String(160))
    map_scale: Mapped[int | None] = mapped_column(Integer)
    request_key: Mapped[str | None] = mapped_column(String(64))
    # revision 0003 (rows before it: verdict filled from is_anomalous, the rest NULL)
    verdict: Mapped[str | None] = mapped_column(String(8))  # "OK", "REVIEW", "NOT OK"
    review_threshold: Mapped[float | None] = mapped_column(Float)
    p_value: Mapped[float | None] = mapped_column(Float)
    z_score: Mapped[float | None] = mapped_column(Float)
    reasons: Mapped[str | None] = mapped_column(Text)  # JSON list of lines
    defects: Mapped[str | None] = mapped_column(Text)  # JSON list of regions

    __table_args__ = (
        Index("ix_inspections_created_at", "created_at"),
        Index("ix_inspections_model_created", "model_name", "created_at"),
        Index("ix_inspections_verdict_created", "is_anomalous", "created_at"),
        Index("ux_inspections_request_key", "request_key", unique=True),
        Index("ix_inspections_state_created", "verdict", "created_at"),
    )

    def as_dict(self) -> dict[str, Any]:
        return {column.name: getattr(self, column.name) for column in self.__table__.columns}

    @property
    def state(self) -> str:
        """The verdict ("OK", "REVIEW", "NOT OK"); rows before revision 0003 had two states."""
        return self.verdict or ("NOT OK" if self.is_anomalous else "OK")


class ModelVersion(Base):
    """A model file the service has served (revision 0003), by its SHA-256: what the drift monitor
    compares recent scores with (`normal_scores`: the held-out normal scores, JSON) and what a
    review's audit points at."""

    __tablename__ = "model_versions"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    first_served_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    library_version: Mapped[str | None] = mapped_column(String(64))
    method: Mapped[str | None] = mapped_column(String(64))
    threshold: Mapped[float] = mapped_column(Float, nullable=False)
    review_threshold: Mapped[float | None] = mapped_column(Float)
    target_fpr: Mapped[float | None] = mapped_column(Float)
    review_fpr: Mapped[float | None] = mapped_column(Float)
    rules: Mapped[str | None] = mapped_column(Text)  # JSON
    normal_scores: Mapped[str | None] = mapped_column(Text)  # JSON list, sorted


class Review(Base):
    """An operator's decision on an inspection (revision 0003); an inspection may be reviewed
    again (the newest review counts). The audit columns copy what the decision was made on."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    inspection_id: Mapped[str] = mapped_column(String(32), ForeignKey("inspections.id"), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    decision: Mapped[str] = mapped_column(String(16), nullable=False)  # "good" | "defect"
    operator: Mapped[str] = mapped_column(String(128), nullable=False)
    role: Mapped[str | None] = mapped_column(String(16))  # the token's role (None: no tokens)
    note: Mapped[str | None] = mapped_column(String(1000))
    image_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    model_name: Mapped[str] = mapped_column(String(128), nullable=False)
    model_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    model_library_version: Mapped[str | None] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(8), nullable=False)  # the service's verdict reviewed
    score: Mapped[float] = mapped_column(Float, nullable=False)
    threshold: Mapped[float] = mapped_column(Float, nullable=False)
    review_threshold: Mapped[float | None] = mapped_column(Float)
    rules: Mapped[str | None] = mapped_column(Text)  # JSON, the model's inspection rules

    __table_args__ = (Index("ix_reviews_inspection_created", "inspection_id", "created_at"),)

    def as_dict(self) -> dict[str, Any]:
        return {column.name: getattr(self, column.name) for column in self.__table__.columns}


@dataclass
class InspectionQuery:
    """Filters and page of `InspectionStore.list`; `since` inclusive, `until` exclusive."""

    limit: int = 50
    offset: int = 0
    model: str | None = None
    is_anomalous: bool | None = None
    verdict: str | None = None  # "OK", "REVIEW", "NOT OK"
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


def alembic_config() -> Any:
    """An Alembic Config for the migrations in this package (no alembic.ini needed)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(alembic_config()).get_current_head())


def current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def migrate(engine: Engine, revision: str = "head") -> str | None:
    """Bring the schema to `revision` (default: the newest) in one transaction; returns the
    revision the store had before (None: new or pre-migration store)."""
    from alembic import command

    config = alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        before = current_revision(connection)
        if before is None and inspect(connection).has_table(Inspection.__tablename__):
            command.stamp(config, FIRST_REVISION)  # created by create_all before migrations existed
        command.upgrade(config, revision)
    return before


def _check_finite(fields: dict[str, Any]) -> None:
    for name in ("score", "threshold", "latency_ms"):
        value = fields.get(name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"inspection {name} must be a finite number, got {value!r}; the row is not stored")


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
            migrate(self.engine)
        except (SQLAlchemyError, OSError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
            raise ConfigError(f"cannot open database {parsed.render_as_string(hide_password=True)}: {first_line}") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def describe(self) -> str:
        return self.url.render_as_string(hide_password=True)

    def add(self, **fields: Any) -> Inspection:
        """Insert one inspection (id and created_at filled in when absent) and commit.

        ValueError for a non-finite score, threshold or latency. With a ``request_key`` that
        is already stored, nothing is inserted and the stored row is returned instead.
        """
        _check_finite(fields)
        fields.setdefault("id", uuid.uuid4().hex)
        fields.setdefault("created_at", utc_now())
        fields.setdefault("verdict", "NOT OK" if fields.get("is_anomalous") else "OK")
        row = Inspection(**fields)
        try:
            with self._sessions.begin() as session:
                session.add(row)
        except IntegrityError:
            existing = self.by_request_key(fields.get("request_key"))
            if existing is None:
                raise
            return existing
        return row

    def get(self, inspection_id: str) -> Inspection | None:
        with self._sessions() as session:
            return session.get(Inspection, inspection_id)

    def by_request_key(self, key: str | None) -> Inspection | None:
        """The inspection stored for a client's request key (Idempotency-Key), if any."""
        if not key:
            return None
        with self._sessions() as session:
            return session.scalars(select(Inspection).where(Inspection.request_key == key)).first()

    def set_files(self, inspection_id: str, **paths: str) -> None:
        """Fill in file columns of a stored row (pictures of rows written before revision 0002)."""
        allowed = {"preview_path", "base_path"}
        if set(paths) - allowed:
            raise ValueError(f"only {sorted(allowed)} can be set on a stored inspection")
        with self._sessions.begin() as session:
            session.execute(update(Inspection).where(Inspection.id == inspection_id).values(**paths))

    def list(self, query: InspectionQuery) -> tuple[list[Inspection], int]:
        """One page of inspections, newest first, and the number matching the filters."""
        conditions = []
        if query.model is not None:
            conditions.append(Inspection.model_name == query.model)
        if query.is_anomalous is not None:
            conditions.append(Inspection.is_anomalous == query.is_anomalous)
        if query.verdict is not None:
            conditions.append(Inspection.verdict == query.verdict)
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

    # -- model versions, reviews, recent scores (revision 0003)
    def register_model(self, **fields: Any) -> ModelVersion:
        """Record a served model file by its sha256 (kept as first recorded: the same hash is the same file)."""
        fields.setdefault("first_served_at", utc_now())
        try:
            with self._sessions.begin() as session:
                existing = session.get(ModelVersion, fields["sha256"])
                if existing is not None:
                    return existing
                row = ModelVersion(**fields)
                session.add(row)
        except IntegrityError:  # another process recorded it at the same moment
            with self._sessions() as session:
                found = session.get(ModelVersion, fields["sha256"])
            if found is None:
                raise
            return found
        return row

    def model_versions(self) -> list[ModelVersion]:
        with self._sessions() as session:
            return list(session.scalars(select(ModelVersion).order_by(ModelVersion.name, ModelVersion.first_served_at)))

    def add_review(self, **fields: Any) -> Review:
        fields.setdefault("created_at", utc_now())
        row = Review(**fields)
        with self._sessions.begin() as session:
            session.add(row)
        return row

    def reviews(self, inspection_id: str) -> list[Review]:
        """An inspection's reviews, oldest first (the last one counts)."""
        with self._sessions() as session:
            return list(session.scalars(
                select(Review).where(Review.inspection_id == inspection_id).order_by(Review.created_at, Review.id)
            ))

    def latest_reviews(self, inspection_ids: list[str]) -> dict[str, Review]:
        """The newest review of each of these inspections that has one."""
        latest: dict[str, Review] = {}
        if not inspection_ids:
            return latest
        with self._sessions() as session:
            for row in session.scalars(
                select(Review).where(Review.inspection_id.in_(inspection_ids)).order_by(Review.created_at, Review.id)
            ):
                latest[row.inspection_id] = row
        return latest

    def reviewed(self, decision: str, model: str | None = None) -> list[tuple[Inspection, Review]]:
        """Inspections whose newest review is `decision` ("good" / "defect"), oldest first."""
        newest = select(Review.inspection_id, func.max(Review.id).label("review_id")).group_by(Review.inspection_id).subquery()
        statement = (
            select(Inspection, Review)
            .join(newest, newest.c.inspection_id == Inspection.id)
            .join(Review, Review.id == newest.c.review_id)
            .where(Review.decision == decision)
            .order_by(Inspection.created_at, Inspection.id)
        )
        if model is not None:
            statement = statement.where(Inspection.model_name == model)
        with self._sessions() as session:
            return [(inspection, review) for inspection, review in session.execute(statement).all()]

    def recent_scores(self, model_sha256: str, limit: int) -> list[float]:
        """Image scores of the newest `limit` inspections by this model file, oldest first."""
        with self._sessions() as session:
            scores = session.scalars(
                select(Inspection.score).where(Inspection.model_sha256 == model_sha256)
                .order_by(Inspection.created_at.desc(), Inspection.id.desc()).limit(limit)
            ).all()
        return [float(score) for score in reversed(scores)]

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
    "ModelVersion",
    "Review",
    "default_db_url",
    "file_sha256",
    "sha256_hex",
    "utc_now",
)

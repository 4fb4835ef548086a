"""Schema migrations (Alembic), on SQLite and PostgreSQL: the newest revision equals the models, a
store at the first revision (or made before migrations existed) upgrades in place with its rows
kept, and the log refuses non-finite rows on both."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

from defectlens.service.store import (
    FIRST_REVISION, Base, InspectionQuery, InspectionStore, current_revision, head_revision, migrate,
)

from .conftest import new_database

def fresh(**changes: object) -> dict:
    """OLD_ROW without its id (the store makes one), with `changes`."""
    return {**{key: value for key, value in OLD_ROW.items() if key != "id"}, **changes}


OLD_ROW = {  # a row as revision 0001 stored it
    "id": "0" * 31 + "1", "created_at": datetime(2024, 5, 1, 12, 0), "model_name": "m", "model_sha256": "a" * 64,
    "image_sha256": "b" * 64, "image_name": "old.png", "width": 4, "height": 3, "score": 2.5, "threshold": 1.0,
    "is_anomalous": True, "latency_ms": 12.0, "image_path": "i.png", "heatmap_path": "h.png", "mask_path": "k.png",
    "map_path": "p.npy",
}


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path) -> str:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'log.db'}"
    return new_database(request.getfixturevalue("postgres"))


def _insert_old_row(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        columns = ", ".join(OLD_ROW)
        connection.execute(text(f"INSERT INTO inspections ({columns}) VALUES ({', '.join(':' + c for c in OLD_ROW)})"),
                           OLD_ROW)
    engine.dispose()


def test_the_newest_revision_equals_the_models(url: str) -> None:
    store = InspectionStore(url)
    with store.engine.connect() as connection:
        assert current_revision(connection) == head_revision()
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    store.close()


def test_a_store_at_the_first_revision_upgrades_in_place(url: str) -> None:
    engine = create_engine(url)
    migrate(engine, FIRST_REVISION)
    engine.dispose()
    _insert_old_row(url)

    store = InspectionStore(url)  # opens -> upgrades to the newest revision
    with store.engine.connect() as connection:
        assert current_revision(connection) == head_revision() != FIRST_REVISION
    rows, total = store.list(InspectionQuery())
    assert total == 1 and rows[0].id == OLD_ROW["id"] and rows[0].score == 2.5
    assert rows[0].created_at == datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    assert rows[0].preview_path is None and rows[0].request_key is None  # new columns, old row kept
    assert rows[0].verdict == "NOT OK" and rows[0].p_value is None  # 0003: the verdict filled from is_anomalous
    new = store.add(**fresh(image_name="new.png", request_key="k1", map_scale=2))
    assert store.count() == 2 and store.by_request_key("k1").id == new.id
    store.close()


def test_a_store_made_before_migrations_existed_is_stamped_and_upgraded(url: str) -> None:
    engine = create_engine(url)
    migrate(engine, FIRST_REVISION)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))  # what create_all used to leave
    engine.dispose()
    _insert_old_row(url)
    store = InspectionStore(url)
    assert store.count() == 1 and store.get(OLD_ROW["id"]).image_name == "old.png"
    with store.engine.connect() as connection:
        assert current_revision(connection) == head_revision()
    store.close()


def test_non_finite_rows_are_refused(url: str) -> None:
    store = InspectionStore(url)
    for field in ("score", "threshold", "latency_ms"):
        with pytest.raises(ValueError, match=field):
            store.add(**fresh(**{field: float("nan")}))
    assert store.count() == 0
    store.close()

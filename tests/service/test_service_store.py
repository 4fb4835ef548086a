"""The inspection log in-process: content-addressed atomic files, filters, threads, SQLite pragmas."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from defectlens.errors import ConfigError
from defectlens.service.store import FileStore, InspectionQuery, InspectionStore, sha256_hex


def row(**overrides: object) -> dict:
    fields = dict(
        model_name="m", model_sha256="a" * 64, image_sha256="b" * 64, image_name="x.png", width=4, height=3,
        score=1.0, threshold=0.5, is_anomalous=True, latency_ms=1.0,
        image_path="i", heatmap_path="h", mask_path="k", map_path="p",
    )
    fields.update(overrides)
    return fields


def test_file_store_is_content_addressed_and_leaves_no_temporaries(tmp_path: Path) -> None:
    files = FileStore(tmp_path / "store")
    relative = files.put(b"hello", "png")
    digest = sha256_hex(b"hello")
    assert relative == f"{digest[:2]}/{digest[2:4]}/{digest}.png"
    assert files.path(relative).read_bytes() == b"hello"
    assert files.put(b"hello", "png") == relative
    assert [p.name for p in files.path(relative).parent.iterdir()] == [f"{digest}.png"]
    with pytest.raises(ValueError):
        files.path("../../etc/passwd")


def test_store_filters_pages_and_times(tmp_path: Path) -> None:
    store = InspectionStore(f"sqlite:///{tmp_path / 'log.db'}")
    start = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    for minute in range(10):
        store.add(**row(created_at=start + timedelta(minutes=minute), model_name="a" if minute % 2 else "b",
                        is_anomalous=minute < 3))
    items, total = store.list(InspectionQuery(limit=3))
    assert total == 10 and [item.created_at.minute for item in items] == [9, 8, 7]
    assert items[0].created_at.tzinfo is not None
    assert store.list(InspectionQuery(model="a"))[1] == 5
    assert store.list(InspectionQuery(is_anomalous=True))[1] == 3
    window = InspectionQuery(since=start + timedelta(minutes=2), until=start + timedelta(minutes=5))
    assert [item.created_at.minute for item in store.list(window)[0]] == [4, 3, 2]
    # a zone other than UTC, and a naive time (taken as UTC)
    local = timezone(timedelta(hours=2))
    assert store.list(InspectionQuery(since=datetime(2024, 5, 1, 14, 8, tzinfo=local)))[1] == 2
    assert store.list(InspectionQuery(since=datetime(2024, 5, 1, 12, 8)))[1] == 2
    assert store.list(InspectionQuery(limit=5, offset=8))[0][-1].created_at.minute == 0
    store.close()


def test_sqlite_is_wal_with_full_sync_and_takes_writes_from_many_threads(tmp_path: Path) -> None:
    store = InspectionStore(f"sqlite:///{tmp_path / 'sub' / 'log.db'}")
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: store.add(**row(score=float(i))), range(80)))
    assert store.count() == 80
    store.close()
    reopened = InspectionStore(f"sqlite:///{tmp_path / 'sub' / 'log.db'}")
    assert reopened.count() == 80
    reopened.close()


def test_in_memory_database_and_bad_urls(tmp_path: Path) -> None:
    memory = InspectionStore("sqlite://")
    memory.add(**row())
    assert memory.count() == 1 and memory.ping()
    with pytest.raises(ConfigError):
        InspectionStore("definitely not a url")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_store_is_a_config_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ConfigError):
            FileStore(locked / "store")
    finally:
        locked.chmod(0o700)

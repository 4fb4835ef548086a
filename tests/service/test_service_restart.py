"""Nothing is lost on restart, on SQLite and on PostgreSQL: a killed server comes back on the same
database and store, and parallel clients each get their own row.

SQLite uses the session's server (whatever the other tests logged) and restarts it in place;
PostgreSQL gets a server of its own on a fresh database of the private cluster.
"""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from .conftest import ServerProcess, db_rows, new_database


@pytest.fixture(scope="module")
def postgres_server(brick_model: Path, postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess([str(brick_model)], tmp_path_factory.mktemp("pg-server"), db_url=new_database(postgres))
    yield process.start()
    process.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def backend_server(request: pytest.FixtureRequest) -> ServerProcess:
    return request.getfixturevalue("server" if request.param == "sqlite" else "postgres_server")


def test_history_survives_a_kill_and_a_restart(backend_server: ServerProcess, png_bytes: dict[str, bytes]) -> None:
    server = backend_server
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for kind in ("good", "stain"):
            response = client.post("/v1/inspect", files={"image": (f"{kind}.png", png_bytes[kind], "image/png")})
            assert response.status_code == 200, response.text
        before = client.get("/v1/inspections", params={"limit": 1000}).json()
    assert before["total"] >= 2

    server.stop(signal.SIGKILL)  # no graceful shutdown: acknowledged inspections must be on disk already
    server.start()

    with httpx.Client(base_url=server.url, timeout=60) as client:
        after = client.get("/v1/inspections", params={"limit": 1000}).json()
        assert after == before
        for item in before["items"][:5]:
            assert client.get(f"/v1/inspections/{item['id']}").json() == item
            for url in (item["image_url"], item["heatmap_url"], item["mask_url"]):
                assert client.get(url).status_code == 200
        extra = client.post("/v1/inspect", files={"image": ("again.png", png_bytes["stain"], "image/png")})
        assert extra.status_code == 200
        assert client.get("/v1/inspections").json()["total"] == before["total"] + 1
        assert client.get("/health").json()["inspections"] == before["total"] + 1

    rows = db_rows(server.db_url)
    assert len(rows) == before["total"] + 1
    for row in rows.values():
        for column in ("image_path", "heatmap_path", "mask_path", "map_path"):
            assert (server.store / row[column]).is_file()


def test_parallel_clients(backend_server: ServerProcess, png_bytes: dict[str, bytes]) -> None:
    """4 clients x 5 requests at once: all answered, all logged, each row distinct."""
    server = backend_server

    def worker(index: int) -> list[str]:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            ids = []
            for round_ in range(5):
                image = png_bytes["stain" if (index + round_) % 2 else "good"]
                response = http.post("/v1/inspect", files={"image": (f"c{index}-{round_}.png", image, "image/png")})
                assert response.status_code == 200, response.text
                ids.append(response.json()["id"])
            return ids

    with ThreadPoolExecutor(4) as pool:
        ids = [i for batch in pool.map(worker, range(4)) for i in batch]
    assert len(set(ids)) == 20
    rows = db_rows(server.db_url)
    assert all(inspection_id in rows for inspection_id in ids)

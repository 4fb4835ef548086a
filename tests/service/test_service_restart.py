"""Nothing is lost on restart: a killed server comes back on the same database and store.

Uses the session's server (whatever the other tests logged) and restarts it in place.
"""

from __future__ import annotations

import signal
import sqlite3

import httpx

from .conftest import ServerProcess


def test_history_survives_a_kill_and_a_restart(server: ServerProcess, png_bytes: dict[str, bytes]) -> None:
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

    connection = sqlite3.connect(server.db)
    try:
        assert connection.execute("SELECT COUNT(*) FROM inspections").fetchone()[0] == before["total"] + 1
    finally:
        connection.close()

"""The REST API through a real HTTP server: inspect, list, fetch, files, bad input, the log on disk,
security headers, bounded messages, hostile uploads, idempotent retries."""

from __future__ import annotations

import hashlib
import io
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from .conftest import ServerProcess, random_png
from .conftest import db_rows as rows_of

SECURITY_HEADERS = ("x-content-type-options", "x-frame-options", "referrer-policy", "content-security-policy")


def inspect(client: httpx.Client, data: bytes, name: str = "part.png", headers: dict | None = None,
            **fields: str) -> httpx.Response:
    return client.post("/v1/inspect", files={"image": (name, data, "image/png")}, data=fields, headers=headers)


def db_rows(server: ServerProcess) -> dict[str, dict]:
    return rows_of(server.db_url)


def png_pixels(content: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(content)) as image:
        return np.asarray(image.convert("RGB"))


def png_size(content: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(content)) as image:
        assert image.format == "PNG"
        return image.size


@pytest.fixture()
def client(server: ServerProcess) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def test_health_and_models(client: httpx.Client) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["database"] == "ok"
    assert "bricks" in health["models"]
    models = client.get("/v1/models").json()
    assert models["default"] == "bricks"
    first = models["items"][0]
    assert first["name"] == "bricks" and first["default"] is True
    assert first["method"] == "patchcore" and first["image_size"] == [64, 64]
    assert len(first["sha256"]) == 64 and first["threshold"] > 0
    assert first["file"] == "bricks.dlens"  # the name only: no server path in any answer
    assert health["auth_required"] is False


def test_inspect_list_fetch_and_files(client: httpx.Client, server: ServerProcess, png_bytes: dict[str, bytes]) -> None:
    good = inspect(client, png_bytes["good"], "good.png")
    stain = inspect(client, png_bytes["stain"], "stain.png", model="bricks", threshold="0.5")
    assert good.status_code == 200, good.text
    assert stain.status_code == 200, stain.text
    result = stain.json()
    for key in ("id", "model", "score", "is_anomalous", "threshold", "latency_ms", "heatmap_url", "mask_url", "created_at"):
        assert key in result
    assert result["model"] == "bricks"
    assert result["threshold"] == 0.5 and result["is_anomalous"] is (result["score"] > 0.5)
    assert result["verdict"] == ("NOT OK" if result["is_anomalous"] else "OK")
    assert result["latency_ms"] > 0
    created = datetime.fromisoformat(result["created_at"].replace("Z", "+00:00"))
    assert created.tzinfo is not None and abs(datetime.now(timezone.utc) - created) < timedelta(minutes=5)

    fetched = client.get(f"/v1/inspections/{result['id']}").json()
    assert fetched == result

    for url in (result["image_url"], result["heatmap_url"], result["mask_url"]):
        response = client.get(url)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert png_size(response.content) == (96, 96)
    # the input as a PNG the service encoded: the same pixels as the upload (never the upload's own bytes)
    np.testing.assert_array_equal(png_pixels(client.get(result["image_url"]).content), png_pixels(png_bytes["stain"]))

    # Re-thresholding the stored map: 0 marks every pixel, a huge threshold none; no new row.
    rows_before = len(db_rows(server))
    everything = np.asarray(Image.open(io.BytesIO(client.get(result["mask_url"], params={"threshold": 0}).content)))
    nothing = np.asarray(Image.open(io.BytesIO(client.get(result["mask_url"], params={"threshold": 1e9}).content)))
    assert everything.min() == 255 and nothing.max() == 0
    redrawn = client.get(result["heatmap_url"], params={"threshold": result["score"] * 2})
    assert redrawn.status_code == 200 and png_size(redrawn.content) == (96, 96)
    assert len(db_rows(server)) == rows_before

    listing = client.get("/v1/inspections", params={"limit": 1000}).json()
    ids = [item["id"] for item in listing["items"]]
    assert result["id"] in ids and good.json()["id"] in ids
    assert listing["total"] == len(ids)


def test_every_accepted_request_is_in_the_database_with_its_files(
    client: httpx.Client, server: ServerProcess, png_bytes: dict[str, bytes]
) -> None:
    accepted = [inspect(client, png_bytes["good"], f"part{index}.png").json()["id"] for index in range(3)]
    rows = db_rows(server)
    for inspection_id in accepted:
        row = rows[inspection_id]
        assert row["model_name"] == "bricks" and len(row["model_sha256"]) == 64 and len(row["image_sha256"]) == 64
        assert row["created_at"] and row["latency_ms"] > 0
        for column in ("image_path", "heatmap_path", "mask_path", "map_path", "preview_path", "base_path"):
            path = server.store / row[column]
            assert path.is_file(), f"{column} {path} missing"
            assert (path.parent.parent.name, path.parent.name) == (path.stem[:2], path.stem[2:4])  # ab/cd/abcd...
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem
        assert (server.store / row["image_path"]).stem == row["image_sha256"]
        assert np.load(server.store / row["map_path"]).dtype == np.float16
        assert row["map_scale"] == 1 and row["request_key"] is None
    # same image, same files (content-addressed)
    assert len({rows[i]["image_path"] for i in accepted}) == 1
    connection = sqlite3.connect(server.db)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        connection.close()


def test_pagination_and_filters(client: httpx.Client, png_bytes: dict[str, bytes]) -> None:
    stored_before = client.get("/v1/inspections").json()["total"]
    before = datetime.now(timezone.utc)
    ok = inspect(client, png_bytes["good"], threshold="1e9").json()
    not_ok = inspect(client, png_bytes["good"], threshold="0").json()
    assert ok["verdict"] == "OK" and not_ok["verdict"] == "NOT OK"

    since = client.get("/v1/inspections", params={"since": before.isoformat()}).json()
    assert since["total"] == 2 and {item["id"] for item in since["items"]} == {ok["id"], not_ok["id"]}
    created = [datetime.fromisoformat(item["created_at"]) for item in since["items"]]
    assert created == sorted(created, reverse=True)  # newest first, by the stored times
    only_bad = client.get("/v1/inspections", params={"since": before.isoformat(), "verdict": "not_ok"}).json()
    assert [item["id"] for item in only_bad["items"]] == [not_ok["id"]]
    only_good = client.get("/v1/inspections", params={"since": before.isoformat(), "is_anomalous": "false"}).json()
    assert [item["id"] for item in only_good["items"]] == [ok["id"]]
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")  # naive = UTC
    assert client.get("/v1/inspections", params={"since": future}).json()["total"] == 0
    assert client.get("/v1/inspections", params={"until": before.isoformat()}).json()["total"] == stored_before
    assert client.get("/v1/inspections", params={"model": "no-such-model"}).json() == {
        "items": [], "total": 0, "limit": 50, "offset": 0
    }

    everything = client.get("/v1/inspections", params={"limit": 1000}).json()
    assert everything["total"] == stored_before + 2
    page = client.get("/v1/inspections", params={"limit": 1, "offset": 1}).json()
    assert page["total"] == everything["total"] and page["items"][0]["id"] == everything["items"][1]["id"]


@pytest.mark.parametrize(
    ("fields", "files", "status", "phrase"),
    [
        ({}, {"image": ("empty.png", b"", "image/png")}, 400, "empty"),
        ({}, {"image": ("notes.txt", b"this is not an image", "text/plain")}, 415, "notes.txt"),
        ({}, {"image": ("cut.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png")}, 415, "cut.png"),
        ({"model": "nope"}, {"image": ("a.png", "GOOD", "image/png")}, 404, "available models: bricks"),
        ({"threshold": "abc"}, {"image": ("a.png", "GOOD", "image/png")}, 422, "threshold must be a number"),
        ({"threshold": "-1"}, {"image": ("a.png", "GOOD", "image/png")}, 422, "finite number >= 0"),
        ({"threshold": "inf"}, {"image": ("a.png", "GOOD", "image/png")}, 422, "finite number"),
        ({"comment": "no image"}, None, 422, "field named 'image'"),
    ],
)
def test_bad_inspect_requests_are_refused_clearly(
    client: httpx.Client, server: ServerProcess, png_bytes: dict[str, bytes], fields: dict, files: dict | None, status: int, phrase: str
) -> None:
    if files and files["image"][1] == "GOOD":
        files = {"image": (files["image"][0], png_bytes["good"], "image/png")}
    rows = len(db_rows(server))
    response = client.post("/v1/inspect", data=fields, files=files) if files else client.post("/v1/inspect", data=fields)
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["detail"], str) and phrase in body["detail"]
    if status == 404:
        assert "bricks" in body["models"]
    assert len(db_rows(server)) == rows
    assert client.get("/health").status_code == 200  # still serving


def test_uploads_over_the_limit_get_413(client: httpx.Client, server: ServerProcess) -> None:
    rows = len(db_rows(server))
    big = random_png(size=800, seed=1)  # ~1.9 MB of noise; the server's limit is 1 MB
    assert len(big) > 1024 * 1024 * 1.2
    response = inspect(client, big, "big.png")
    assert response.status_code == 413 and "1 MB" in response.json()["detail"]

    boundary = "defectlens-test-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks():  # no Content-Length: the server has to count
        yield head
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]
        yield tail

    streamed = client.post("/v1/inspect", content=chunks(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert streamed.status_code == 413, streamed.text
    assert len(db_rows(server)) == rows
    assert client.get("/health").status_code == 200


def test_unknown_ids_and_bad_queries(client: httpx.Client) -> None:
    for path in ("/v1/inspections/nope", "/v1/inspections/nope/heatmap.png", "/v1/inspections/nope/mask.png",
                 "/v1/inspections/nope/image.png"):
        response = client.get(path)
        assert response.status_code == 404 and "nope" in response.json()["detail"]
    long_id = "x" * 10_000  # echoed back shortened, not in full
    response = client.get(f"/v1/inspections/{long_id}")
    assert response.status_code == 404 and len(response.text) < 200, response.text[:300]
    for params, phrase in (
        ({"limit": 0}, "limit"),
        ({"limit": 100000}, "limit"),
        ({"offset": -1}, "offset"),
        ({"offset": 9223372036854775808}, "offset"),  # was a 500 OverflowError
        ({"offset": 10**7}, "offset"),
        ({"since": "0001-01-01T00:00:00+01:00"}, "since"),  # before year 1 in UTC
        ({"model": "a\x00b"}, "model"),
        ({"since": "yesterday"}, "since"),
        ({"verdict": "maybe"}, "verdict"),
        ({"since": "2024-01-02", "until": "2024-01-01"}, "after"),
    ):
        response = client.get("/v1/inspections", params=params)
        assert response.status_code == 422 and phrase in response.json()["detail"], (params, response.text)


def test_ui_page_and_docs_are_served_without_a_cdn(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for element in ('id="file"', 'id="verdict"', 'id="score"', 'id="overlay"', 'id="threshold"', 'id="history"'):
        assert element in page.text
    assert "http://" not in page.text and "https://" not in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/openapi.json").json()["paths"]["/v1/inspect"]
    docs = client.get("/docs")
    assert docs.status_code == 200
    if "/docs-assets/" in docs.text:  # swagger-ui-py installed: fully offline
        assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_store_paths_are_relative(server: ServerProcess, client: httpx.Client, png_bytes: dict[str, bytes]) -> None:
    own = inspect(client, png_bytes["stain"], name="own.png").json()["id"]
    rows = db_rows(server)
    assert own in rows
    for row in rows.values():
        for column in ("image_path", "heatmap_path", "mask_path", "map_path"):
            assert not Path(row[column]).is_absolute() and ".." not in row[column]


def test_security_headers_on_every_response(client: httpx.Client, png_bytes: dict[str, bytes]) -> None:
    row = inspect(client, png_bytes["good"], "headers.png").json()
    responses = [
        client.get("/"), client.get("/static/app.js"), client.get("/health"), client.get("/v1/models"),
        client.get("/v1/inspections"), client.get(row["image_url"]), client.get(row["mask_url"], params={"threshold": 1}),
        client.get("/v1/inspections/nope"), client.get("/v1/inspections", params={"limit": 0}), client.get("/no/such/page"),
        client.get("/openapi.json"), client.get("/docs"), client.post("/v1/inspect", data={"x": "y"}),
    ]
    for response in responses:
        for header in SECURITY_HEADERS:
            assert header in response.headers, (response.request.url, response.status_code, header)
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
    assert "script-src 'self'" in responses[0].headers["content-security-policy"]
    assert "unsafe-inline" not in responses[0].headers["content-security-policy"]
    assert "frame-ancestors 'none'" in responses[0].headers["content-security-policy"]
    assert responses[3].headers["cache-control"] == "no-store"


def test_a_png_html_polyglot_is_served_as_a_clean_png(client: httpx.Client, png_bytes: dict[str, bytes]) -> None:
    html = b"<html><body><script>document.title='pwned'</script></body></html>"
    polyglot = png_bytes["good"] + html  # a valid PNG with an HTML page after IEND
    response = inspect(client, polyglot, "polyglot.html")
    assert response.status_code == 200, response.text
    served = client.get(response.json()["image_url"])
    assert served.headers["content-type"] == "image/png" and served.headers["x-content-type-options"] == "nosniff"
    assert b"<script" not in served.content and b"<html" not in served.content
    np.testing.assert_array_equal(png_pixels(served.content), png_pixels(png_bytes["good"]))


def _tiff(array: np.ndarray) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("name", "make", "status"),
    [
        ("nan.tif", lambda: _tiff(np.full((32, 32), np.nan, np.float32)), 422),  # NaN never reaches the database
        ("inf.tif", lambda: _tiff(np.full((32, 32), np.inf, np.float32)), 422),
        ("random.tif", lambda: b"II*\x00" + np.random.default_rng(0).bytes(4000), 415),  # was a 500 IndexError
        ("bomb.png", lambda: _png_header_only(14000, 14000), 413),  # refused from the header, nothing decoded
        ("html.png", lambda: b"<!DOCTYPE html><html><script>alert(1)</script></html>", 415),
    ],
)
def test_hostile_uploads_get_a_short_generic_4xx(
    client: httpx.Client, server: ServerProcess, name: str, make, status: int
) -> None:
    rows = len(db_rows(server))
    response = inspect(client, make(), name)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert len(detail) < 300 and name in detail
    for leak in ("Error", "Exception", "Traceback", "SQL", "INSERT", str(server.store), "/tmp", "site-packages"):
        assert leak not in detail, detail
    assert len(db_rows(server)) == rows
    assert client.get("/health").status_code == 200


def test_hostile_file_names_are_stored_cleaned(client: httpx.Client, png_bytes: dict[str, bytes]) -> None:
    for name in ("../../etc/passwd", "nul\x00byte.png", "<script>alert(1)</script>.png", "a" * 1000 + ".png"):
        response = inspect(client, png_bytes["good"], name)
        assert response.status_code == 200, (name[:40], response.text[:200])
        stored = response.json()["image_name"]
        assert "\x00" not in stored and len(stored) <= 255


def test_a_cross_origin_form_post_is_refused(client: httpx.Client, server: ServerProcess, png_bytes: dict[str, bytes]) -> None:
    rows = len(db_rows(server))
    foreign = [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"},
        {"Origin": server.url, "Sec-Fetch-Site": "same-origin"},  # same origin, but no client header: a plain form
    ]
    for headers in foreign:
        response = inspect(client, png_bytes["good"], "csrf.png", headers=headers)
        assert response.status_code == 403, (headers, response.text)
    assert len(db_rows(server)) == rows
    # the operator UI's own request (same origin, its header) and non-browser clients pass
    ui = {"Origin": server.url, "Sec-Fetch-Site": "same-origin", "X-Defectlens-Client": "ui"}
    assert inspect(client, png_bytes["good"], "ui.png", headers=ui).status_code == 200
    # a foreign Host (DNS rebinding) is refused while bound to 127.0.0.1
    assert client.get("/v1/models", headers={"Host": "rebind.example:8000"}).status_code == 400


def test_a_retried_upload_with_an_idempotency_key_is_stored_once(
    client: httpx.Client, server: ServerProcess, png_bytes: dict[str, bytes]
) -> None:
    key = {"Idempotency-Key": f"retry-{np.random.default_rng().integers(1 << 60)}"}
    first = inspect(client, png_bytes["stain"], "retry.png", headers=key)
    again = inspect(client, png_bytes["stain"], "retry.png", headers=key)
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"] and again.headers.get("idempotent-replayed") == "true"
    assert sum(row["request_key"] == key["Idempotency-Key"] for row in db_rows(server).values()) == 1
    other = inspect(client, png_bytes["good"], "other.png", headers=key)
    assert other.status_code == 409
    assert inspect(client, png_bytes["good"], headers={"Idempotency-Key": "has space"}).status_code == 422

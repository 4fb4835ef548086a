"""Fuzzing the HTTP API of a running server, bounded for CI (about 40 s on 2 cores, server start aside):

- every GET operation of the server's own OpenAPI schema, with generated values for each of its
  parameters (hypothesis: huge and negative integers, floats, NaN, unicode and control
  characters, long strings, real ids);
- generated uploads: random bytes behind image magic numbers, mutated valid images, hostile
  file names, odd model and threshold values;
- a seeded sample of the hostile corpus (benchmarks/hostile_corpus.py), each file's expected
  outcome checked (413 for bombs, 415 for other formats, 200 for valid images).

Every answer: no 5xx, the security headers, a short error body without exception names, SQL
or server paths; the database gains exactly one row per 200. The full >= 1,000-upload run with
RSS and hang counts is `benchmarks/service_fuzz.py`.
"""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import ServerProcess, db_rows
from .fuzzing import build_hostile_corpus, multipart, problems

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"II*\x00", b"MM\x00*", b"BM", b"RIFF\x00\x00\x00\x00WEBP",
         b"GIF89a", b"\x00\x00\x01\x00", b"<svg", b"%PDF", b""]
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)
ODD_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    TEXT, st.sampled_from(["", " ", "nan", "inf", "-1", "1e309", "0x10", "9" * 400, "true", "null", "'; DROP TABLE x;--",
                           "2024-13-45", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "\x00", "%00"]),
)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def get_operations(client: httpx.Client) -> list[tuple[str, list[str]]]:
    """(path template, parameter names) of every GET in the server's OpenAPI schema."""
    schema = client.get("/openapi.json").json()
    operations = []
    for path, item in schema["paths"].items():
        if "get" in item:
            operations.append((path, [p["name"] for p in item["get"].get("parameters", [])]))
    assert any(path == "/v1/inspections" for path, _ in operations)
    return operations


@pytest.fixture(scope="module")
def known_id(client: httpx.Client, png_bytes: dict[str, bytes]) -> str:
    response = client.post("/v1/inspect", files={"image": ("known.png", png_bytes["good"], "image/png")})
    return response.json()["id"]


def test_get_operations_with_generated_parameters(client: httpx.Client, get_operations, known_id: str) -> None:
    @FUZZ
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        path, names = data.draw(st.sampled_from(get_operations))
        values = {name: data.draw(st.one_of(ODD_VALUES, st.just(known_id)) if name == "inspection_id" else ODD_VALUES,
                                  label=name) for name in names}
        url = path
        for name in names:
            if "{" + name + "}" in url:
                url = url.replace("{" + name + "}", httpx.URL("/", params={"x": values.pop(name)}).params["x"] or "_")
        try:
            response = client.get(url, params=values)
        except httpx.InvalidURL:
            return
        found = problems(response.status_code, response.headers, response.text, tuple(map(str, values.values())))
        assert not found, (url, values, found)
        assert response.status_code in (200, 400, 404, 410, 422), (url, values, response.status_code)

    check()


def _uploads() -> st.SearchStrategy:
    content = st.one_of(
        st.tuples(st.sampled_from(MAGIC), st.binary(max_size=3000)).map(lambda pair: pair[0] + pair[1]),
        st.binary(max_size=64),
    )
    return st.fixed_dictionaries({
        "content": content,
        "name": st.one_of(TEXT, st.text(max_size=300), st.sampled_from(["../../etc/passwd", "a\r\nX-Evil: 1.png", ""])),
        "model": st.one_of(st.none(), st.just("bricks"), TEXT),
        "threshold": st.one_of(st.none(), ODD_VALUES),
    })


def test_generated_uploads(client: httpx.Client, server: ServerProcess, png_bytes: dict[str, bytes]) -> None:
    before = len(db_rows(server.db_url))
    accepted = 0
    valid = png_bytes["good"]

    @FUZZ
    @given(upload=_uploads(), mutate=st.one_of(st.none(), st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255))))
    def check(upload: dict, mutate: tuple[int, int] | None) -> None:
        nonlocal accepted
        content = upload["content"]
        if mutate is not None:  # a valid image with one byte changed
            position, value = mutate
            content = valid[:position] + bytes([value]) + valid[position + 1:]
        body, kind = multipart({"model": upload["model"], "threshold": upload["threshold"]}, upload["name"], content)
        response = client.post("/v1/inspect", content=body, headers={"Content-Type": kind})
        sent = tuple(str(v) for v in (upload["name"], upload["model"], upload["threshold"]) if v)
        found = problems(response.status_code, response.headers, response.text, sent)
        assert not found, (upload, found)
        assert response.status_code in (200, 400, 404, 413, 415, 422), (upload, response.status_code, response.text)
        accepted += response.status_code == 200

    check()
    assert len(db_rows(server.db_url)) == before + accepted


def test_a_sample_of_the_hostile_corpus(client: httpx.Client, server: ServerProcess, tmp_path: Path) -> None:
    manifest = build_hostile_corpus(tmp_path / "corpus")
    assert manifest["files"] >= 1000
    by_category: dict[str, list[dict]] = {}
    for entry in manifest["entries"]:
        by_category.setdefault(entry["category"], []).append(entry)
    rng = random.Random(7)
    sample = [entry for entries in by_category.values() for entry in rng.sample(entries, min(8, len(entries)))]
    expected = {"ok": {200}, "too_large": {413}, "format": {415}, "refused": {413, 415, 422}, "any": {200, 413, 415, 422}}
    before = len(db_rows(server.db_url))
    statuses = []
    for entry in sample:
        content = (tmp_path / "corpus" / entry["file"]).read_bytes()
        response = client.post("/v1/inspect", files={"image": (entry["upload_name"], content, "application/octet-stream")})
        found = problems(response.status_code, response.headers, response.text, (entry["upload_name"],))
        assert not found, (entry["file"], found)
        allowed = expected[entry["expect"]] | ({413} if entry["expect"] in ("ok", "any") else set())
        assert response.status_code in allowed, (entry["file"], entry["expect"], response.status_code, response.text)
        statuses.append(response.status_code)
    assert len(db_rows(server.db_url)) == before + statuses.count(200)
    assert {200, 413, 415} <= set(statuses)

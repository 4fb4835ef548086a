"""Helpers shared by the fuzz test (tests/service/test_service_fuzz.py) and the fuzz benchmark
(benchmarks/service_fuzz.py): raw multipart bodies with any file name, what an answer must
never contain, and the hostile-corpus generator loaded from benchmarks/hostile_corpus.py."""

from __future__ import annotations

import importlib.util
import re
import secrets
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
LEAKS = re.compile(
    r"Traceback|\bSQL\b|INSERT INTO|SELECT |sqlite3|psycopg|IntegrityError|OperationalError|"
    r"\b[A-Z][a-zA-Z]*(?:Error|Exception)\b|site-packages|/tmp/|/root/|/home/|/work/|/srv/"
)
SECURITY_HEADERS = ("x-content-type-options", "x-frame-options", "referrer-policy", "content-security-policy")
MAX_BODY = 2000  # characters of any error body


def multipart(fields: dict[str, str | None], filename: str | None, content: bytes | None,
              field: str = "image") -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request; the file name is sent as UTF-8
    bytes (lone surrogates and control characters included, as a hostile client would)."""
    boundary = "fuzz" + secrets.token_hex(12)
    parts = []
    for name, value in fields.items():
        if value is None:
            continue
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                     + value.encode("utf-8", "surrogatepass") + b"\r\n")
    if content is not None:
        quoted = (filename or "").replace("\\", "\\\\").replace('"', '\\"').encode("utf-8", "surrogatepass")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="'.encode() + quoted
                     + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + content + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def problems(status: int, headers: dict[str, str], text: str, sent: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with an answer: a 5xx, a missing security header, a long or leaking error body
    (what the client `sent` itself, echoed back shortened, is no leak)."""
    found = []
    for value in sorted(sent, key=len, reverse=True):
        for piece in (value, value[:57], repr(value[:57])[1:-1]):
            if len(piece) >= 3:
                text = text.replace(piece, "")
    if status >= 500:
        found.append(f"status {status}")
    for header in SECURITY_HEADERS:
        if header not in headers:
            found.append(f"no {header}")
    if status >= 400:
        if len(text) > MAX_BODY:
            found.append(f"error body of {len(text)} characters")
        leak = LEAKS.search(text)
        if leak:
            found.append(f"leak {leak.group(0)!r} in {text[:160]!r}")
    return found


def hostile_corpus_module() -> ModuleType:
    """benchmarks/hostile_corpus.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("hostile_corpus", REPO / "benchmarks" / "hostile_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_hostile_corpus(out: Path, seed: int = 0) -> dict:
    """Write the hostile corpus to `out` (files/ + manifest.json) and return the manifest."""
    import json

    module = hostile_corpus_module()
    corpus = module.Corpus(out, seed)
    module.build(corpus)
    return json.loads(module.write_manifest(corpus).read_text())

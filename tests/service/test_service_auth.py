"""API tokens through a real server: 401 without or with a wrong token, 403 for a read token on a
write endpoint, hashed tokens at rest, the `defectlens token` helper, and a refused open bind."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import pytest

from defectlens import cli
from defectlens.service.cli import main as serve_main

from .conftest import ServerProcess, db_rows


def make_token(path: Path, role: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["token", "--role", role, "--file", str(path), "--note", f"{role} test"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token.startswith("dl_") and len(token) > 40
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_the_token_command_writes_hashes_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "tokens.txt"
    first = make_token(file, "write", capsys)
    second = make_token(file, "read", capsys)
    text = file.read_text()
    assert first not in text and second not in text  # only hashes at rest
    lines = [line for line in text.splitlines() if line.strip()]
    assert [line.split(":")[0] for line in lines] == ["write", "read"]
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    from defectlens.service.security import TokenTable

    table = TokenTable.read(file)
    assert table.role_of(first) == "write" and table.role_of(second) == "read" and table.role_of("dl_nope") is None


def test_401_401_403_and_200_by_token(auth_server: ServerProcess, tokens: dict, png_bytes: dict[str, bytes]) -> None:
    read, write = bearer(tokens["read"]), bearer(tokens["write"])
    wrong = bearer("dl_" + "x" * 43)
    files = {"image": ("part.png", png_bytes["stain"], "image/png")}
    with httpx.Client(base_url=auth_server.url, timeout=60) as client:
        rows = len(db_rows(auth_server.db_url))
        assert client.post("/v1/inspect", files=files).status_code == 401
        assert client.post("/v1/inspect", files=files, headers=wrong).status_code == 401
        refused = client.post("/v1/inspect", files=files, headers=read)
        assert refused.status_code == 403 and "write" in refused.json()["detail"]
        assert len(db_rows(auth_server.db_url)) == rows  # nothing stored by a refused request
        accepted = client.post("/v1/inspect", files=files, headers=write)
        assert accepted.status_code == 200, accepted.text
        row = accepted.json()

        for path in ("/v1/inspections", f"/v1/inspections/{row['id']}", row["image_url"], row["heatmap_url"],
                     row["mask_url"], "/v1/models", "/v1/whoami"):
            missing = client.get(path)
            assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer"), path
            assert client.get(path, headers=wrong).status_code == 401, path
            assert client.get(path, headers=read).status_code == 200, path
            assert client.get(path, headers={"X-API-Key": tokens["write"]}).status_code == 200, path
        assert client.get("/v1/whoami", headers=read).json() == {"auth_required": True, "role": "read"}
        assert client.get("/v1/whoami", headers=write).json()["role"] == "write"

        public = client.get("/health").json()  # for load balancers: alive, but nothing about the log
        assert public["status"] == "ok" and public["auth_required"] is True
        assert public["models"] is None and public["inspections"] is None
        assert client.get("/health", headers=read).json()["inspections"] == rows + 1
        assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200
        assert client.get(row["image_url"], headers=read).headers["cache-control"].startswith("private")


def test_a_bad_token_file_stops_the_start(tmp_path: Path, brick_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "tokens.txt"
    broken.write_text("admin:1234\n")
    args = ["--model", str(brick_model), "--store", str(tmp_path / "store"), "--auth-token-file", str(broken)]
    assert serve_main(args) == 2
    err = capsys.readouterr().err
    assert "line 1" in err and "ROLE:SHA256" in err and "1234" not in err and "Traceback" not in err
    assert serve_main(["--model", str(brick_model), "--auth-token-file", str(tmp_path / "none.txt")]) == 2
    assert "cannot read the token file" in capsys.readouterr().err


def test_no_open_service_on_all_interfaces(tmp_path: Path, brick_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main(["--model", str(brick_model), "--host", "0.0.0.0", "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "--auth-token-file" in err and "--allow-unauthenticated" in err
    from defectlens.service.cli import _is_loopback

    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.0.2.1")

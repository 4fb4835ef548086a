"""A throwaway PostgreSQL cluster for tests and benchmarks: Debian's `postgresql` binaries,
a temporary data folder, listening on 127.0.0.1 on a free port, stopped (and deleted) after.

Run as root (CI, containers), the server runs as the ``postgres`` user that Debian's package
creates (``initdb`` refuses root), through ``runuser``. Authentication is SCRAM with a random
password; each test gets a database of its own (`create_database`).

``make postgres-deps`` (part of ``make test``) installs the package when it is missing.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def postgres_bindir() -> Path | None:
    """Folder of initdb / pg_ctl: $DEFECTLENS_PG_BIN, Debian's newest /usr/lib/postgresql/N/bin, or PATH."""
    explicit = os.environ.get("DEFECTLENS_PG_BIN")
    if explicit and (Path(explicit) / "initdb").is_file():
        return Path(explicit)
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]) if
                    Path(p).parts[-3].isdigit() else 0)
    if debian:
        return Path(debian[-1]).parent
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateCluster:
    """`start()` -> admin URL; `create_database(name)` -> its SQLAlchemy URL; `stop()`."""

    USER = "defectlens"

    def __init__(self, bindir: Path | None = None) -> None:
        found = bindir or postgres_bindir()
        if found is None:
            raise FileNotFoundError("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.bindir: Path = found
        self.password = secrets.token_hex(16)
        self.port = 0
        self.root: Path | None = None
        self.run_as: str | None = None
        if os.geteuid() == 0:
            try:
                self.run_as = pwd.getpwnam("postgres").pw_name
            except KeyError:
                self.run_as = "nobody"

    def _command(self, *args: str) -> list[str]:
        prefix = ["runuser", "-u", self.run_as, "--"] if self.run_as else []
        return [*prefix, *args]

    def _chown(self, path: Path) -> None:
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> str:
        self.root = Path(tempfile.mkdtemp(prefix="defectlens-pg-"))
        self._chown(self.root)
        secret = self.root / "password"
        secret.write_text(self.password)
        self._chown(secret)
        data = self.root / "data"
        subprocess.run(
            self._command(str(self.bindir / "initdb"), "-D", str(data), "-U", self.USER, "--auth=scram-sha-256",
                          f"--pwfile={secret}", "-E", "UTF8", "--no-sync", "--locale=C"),
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        secret.unlink()
        for attempt in range(3):
            self.port = _free_port()
            options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c max_connections=200"
            result = subprocess.run(
                self._command(str(self.bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                              str(self.root / "server.log"), "-w", "-t", "60", "start"),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            if result.returncode == 0:
                return self.url("postgres")
        raise RuntimeError(f"PostgreSQL did not start: {self.log_tail()}")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.USER, password=self.password,
                             dbname="postgres", autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_tail(self, lines: int = 20) -> str:
        log = self.root / "server.log" if self.root else None
        if log is None or not log.is_file():
            return "(no server log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.root is None:
            return
        data = self.root / "data"
        if (data / "postmaster.pid").exists():
            subprocess.run(self._command(str(self.bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> "PrivateCluster":
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

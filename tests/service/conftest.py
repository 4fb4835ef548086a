"""Fixtures for the inspection service: small models, and real servers on 127.0.0.1.

The servers are separate processes (`python -m defectlens.service.cli`, the same code as
`defectlens serve`) listening on a free port, so the tests go through real HTTP, real uvicorn
and a real SQLite file - or a real PostgreSQL database in a private cluster (`postgres`
fixture, see postgres.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import httpx
import numpy as np
import pytest

from .postgres import PrivateCluster, postgres_bindir

REPO = Path(__file__).resolve().parents[2]
DATA_ROOT = Path(os.environ.get("DEFECTLENS_DATA", REPO.parent / "shared" / "data"))
TRANSISTOR = DATA_ROOT / "mvtec_ad" / "transistor"
IN_CI = os.environ.get("CI", "").lower() == "true"


def skip_or_fail(message: str) -> None:
    """Skip outside CI; under CI=true a missing prerequisite is a failure."""
    if IN_CI:
        pytest.fail(f"{message} (CI=true: required)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`defectlens serve` in a child process; `url`, `db_url` (default: the SQLite file `db`) and
    `store` (folder)."""

    def __init__(self, models: Sequence[str], workdir: Path, extra: Sequence[str] = (), db_url: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.models = list(models)
        self.workdir = workdir
        self.store = workdir / "store"
        self.db = workdir / "inspections.db"
        self.db_url = db_url or f"sqlite:///{self.db}"
        self.extra = list(extra)
        self.env = env
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> "ServerProcess":
        self.port = free_port()
        command = [sys.executable, "-m", "defectlens.service.cli", "--host", "127.0.0.1", "--port", str(self.port)]
        for model in self.models:
            command += ["--model", model]
        command += ["--db", self.db_url, "--store", str(self.store), "--log-level", "warning", *self.extra]
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(self.env or {})}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not answer /health within {timeout} s:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def _fit_tiny(images: list, out: Path, image_size: int) -> Path:
    from defectlens.detector import Detector

    Detector(method="patchcore", image_size=image_size, coreset_ratio=0.1, calibration_images=20).fit(images).save(out)
    return out


@pytest.fixture(scope="session")
def brick_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MVTec-layout set of brick-wall crops with synthetic stains (always available offline)."""
    from defectlens.demo import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("bricks"), train_count=12, test_good=3, per_kind=3)


@pytest.fixture(scope="session")
def brick_model(brick_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    images = sorted((brick_data / "train" / "good").glob("*.png"))
    return _fit_tiny(images, tmp_path_factory.mktemp("models") / "bricks.dlens", image_size=64)


@pytest.fixture(scope="session")
def transistor_model(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """PatchCore at 96 px on 10 good transistors, or None without the shared data."""
    good = sorted((TRANSISTOR / "train" / "good").glob("*.png"))[:10]
    if len(good) < 10:
        return None
    return _fit_tiny(good, tmp_path_factory.mktemp("models") / "transistor.dlens", image_size=96)


@pytest.fixture(scope="session")
def server(brick_model: Path, transistor_model: Path | None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the API and browser tests: models 'bricks' (default) and 'transistor'."""
    models = [str(brick_model)] + ([f"transistor={transistor_model}"] if transistor_model else [])
    process = ServerProcess(models, tmp_path_factory.mktemp("server"), extra=["--max-upload-mb", "1"]).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A token file with one read and one write token; the tokens themselves."""
    from defectlens.service.security import new_token, token_line

    folder = tmp_path_factory.mktemp("tokens")
    read, write = new_token(), new_token()
    file = folder / "tokens.txt"
    file.write_text(f"# test tokens\n{token_line('read', read, 'reader')}\n{token_line('write', write)}\n\n")
    return {"file": file, "read": read, "write": write}


@pytest.fixture(scope="session")
def auth_server(brick_model: Path, tokens: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server (model 'bricks') that needs API tokens."""
    process = ServerProcess([str(brick_model)], tmp_path_factory.mktemp("auth-server"),
                            extra=["--auth-token-file", str(tokens["file"])])
    yield process.start()
    process.stop()


@pytest.fixture(scope="session")
def png_bytes(brick_data: Path) -> dict[str, bytes]:
    """A good and a stained brick crop as PNG bytes."""
    return {
        "good": (brick_data / "test" / "good" / "000.png").read_bytes(),
        "stain": (brick_data / "test" / "stain" / "000.png").read_bytes(),
    }


@pytest.fixture(scope="session")
def postgres() -> Iterator[PrivateCluster]:
    """A private PostgreSQL cluster on 127.0.0.1 for this test session (skips outside CI without it)."""
    if postgres_bindir() is None:
        skip_or_fail("PostgreSQL server binaries not found (make postgres-deps, or apt-get install postgresql)")
    cluster = PrivateCluster()
    cluster.start()
    yield cluster
    cluster.stop()


def new_database(cluster: PrivateCluster) -> str:
    import uuid

    return cluster.create_database(f"t_{uuid.uuid4().hex[:12]}")


def db_rows(url: str) -> dict[str, dict]:
    """Every inspection row of a database, by id (SQLite or PostgreSQL)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return {row["id"]: dict(row) for row in connection.execute(text("SELECT * FROM inspections")).mappings()}
    finally:
        engine.dispose()


def random_png(size: int = 96, seed: int = 0) -> bytes:
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def review_model(brick_model: Path, brick_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The brick model with two thresholds set so that the good test crops are REVIEW and the
    first stained crop NOT OK (saved, so re-sealed, like `defectlens rules` / `recalibrate` do)."""
    from defectlens.detector import Detector

    detector = Detector.load(brick_model)
    good = [float(p.score) for p in detector.predict_batch(sorted((brick_data / "test" / "good").glob("*.png")))]
    stain = float(detector.predict(brick_data / "test" / "stain" / "000.png").score)
    assert stain > max(good) > min(good) > 0, (good, stain)
    detector.review_threshold = 0.9 * min(good)
    detector.threshold = (max(good) + stain) / 2
    return detector.save(tmp_path_factory.mktemp("models") / "review.dlens")


@pytest.fixture(scope="session")
def review_server(review_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with model 'review' (two thresholds), for the REVIEW and operator-review tests."""
    process = ServerProcess([str(review_model)], tmp_path_factory.mktemp("review-server")).start()
    yield process
    process.stop()

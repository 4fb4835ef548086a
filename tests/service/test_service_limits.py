"""Time limits, the queue limit and failed inspections, with stand-in models in an in-process
server (uvicorn in a thread, real HTTP): a slow model gets 504 and stores nothing, a full queue
gets 429, a queued request past its deadline 503, a NaN score 422 - and the service stays
healthy; an unexpected exception is a generic 500 with ``Connection: close``."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from defectlens.results import Prediction
from defectlens.rules import InspectionRules
from defectlens.service.app import InspectionService, ModelSlot, ServiceLimits, create_app
from defectlens.service.store import FileStore, InspectionStore

from .conftest import free_port, random_png


class StandInDetector:
    """What the service uses of a Detector: predict (sleeping `delay` s), image_size, metadata, ..."""

    method_name = "stand-in"
    backbone = "none"
    image_size = (8, 8)
    preprocess: tuple = ()
    metadata: dict = {}

    def __init__(self, delay: float = 0.0, score: float = 1.0, fail: Exception | None = None) -> None:
        self.delay, self.score, self.fail = delay, score, fail
        self.threshold = 0.5
        self.review_threshold = None
        self.normal_scores = None
        self.target_fpr, self.review_fpr = 0.01, None
        self.rules = InspectionRules()
        self.calls = 0

    def predict(self, pixels: np.ndarray, threshold: float | None = None) -> Prediction:
        self.calls += 1
        time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        decision = self.threshold if threshold is None else threshold
        anomaly_map = np.full(pixels.shape[:2], self.score, np.float32)
        anomalous = bool(self.score > decision)
        return Prediction(self.score, anomaly_map, anomaly_map > decision, anomalous, decision, None, pixels,
                          verdict="NOT OK" if anomalous else "OK")


class ThreadServer:
    def __init__(self, app) -> None:  # type: ignore[no-untyped-def]
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def stand_in_service(tmp_path: Path, limits: ServiceLimits, **detectors: StandInDetector) -> InspectionService:
    slots = {name: ModelSlot(name, tmp_path / f"{name}.dlens", "0" * 64, detector)  # type: ignore[arg-type]
             for name, detector in detectors.items()}
    return InspectionService(slots, InspectionStore(f"sqlite:///{tmp_path / 'log.db'}"), FileStore(tmp_path / "store"),
                             limits)


@pytest.fixture()
def image() -> bytes:
    return random_png(size=24, seed=3)


def post(url: str, image: bytes, model: str, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/v1/inspect", files={"image": ("a.png", image, "image/png")}, data={"model": model},
                      timeout=timeout)


def test_a_slow_inspection_gets_504_and_nothing_is_stored(tmp_path: Path, image: bytes) -> None:
    service = stand_in_service(tmp_path, ServiceLimits(timeout_s=0.5, workers=1, queue=2),
                               slow=StandInDetector(delay=1.5), fast=StandInDetector())
    with ThreadServer(create_app(service)) as server:
        started = time.perf_counter()
        response = post(server.url, image, "slow")
        assert response.status_code == 504 and "nothing was stored" in response.json()["detail"]
        assert time.perf_counter() - started < 1.4  # answered at the deadline, not when the model finished
        time.sleep(1.3)  # the abandoned work ends in the background ...
        assert service.store.count() == 0  # ... without storing anything
        assert post(server.url, image, "fast").status_code == 200  # the worker is healthy
        assert service.store.count() == 1
        assert httpx.get(f"{server.url}/health").json()["queue"]["abandoned_running"] == 0


def test_a_full_queue_gets_429_and_a_queued_request_past_its_deadline_503(tmp_path: Path, image: bytes) -> None:
    detector = StandInDetector(delay=1.0)
    service = stand_in_service(tmp_path, ServiceLimits(timeout_s=1.6, workers=1, queue=1), slow=detector)
    with ThreadServer(create_app(service)) as server, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, server.url, image, "slow") for _ in range(4)]
        codes = sorted(future.result().status_code for future in futures)
        # one runs (200), one waits 1 s for the worker, then runs past its 1.6 s deadline (504) or
        # never starts in time (503); the other two find the queue full (429, with Retry-After)
        assert codes.count(200) == 1 and codes.count(429) == 2, codes
        assert codes[-1] in (503, 504), codes
        busy = post(server.url, image, "slow")
        assert busy.status_code in (200, 429)
        time.sleep(1.5)
        assert post(server.url, image, "slow").status_code == 200
    assert service.store.count() == len([c for c in codes if c == 200]) + (busy.status_code == 200) + 1


def test_a_nan_score_never_reaches_the_database(tmp_path: Path, image: bytes) -> None:
    service = stand_in_service(tmp_path, ServiceLimits(), nan=StandInDetector(score=float("nan")),
                               broken=StandInDetector(fail=RuntimeError("CUDA out of memory at /secret/path")))
    with ThreadServer(create_app(service)) as server:
        response = post(server.url, image, "nan")
        assert response.status_code == 422 and "non-finite" in response.json()["detail"]
        broken = post(server.url, image, "broken")
        assert broken.status_code == 422 and "/secret" not in broken.text and "RuntimeError" not in broken.text
        assert service.store.count() == 0
        assert httpx.get(f"{server.url}/health").status_code == 200


def test_an_unexpected_error_is_a_generic_500_that_closes_the_connection(
    tmp_path: Path, image: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = stand_in_service(tmp_path, ServiceLimits(), ok=StandInDetector())

    def explode(*_args):  # type: ignore[no-untyped-def]
        raise ZeroDivisionError("secret detail from /srv/store")

    monkeypatch.setattr(service.store, "list", explode)
    with ThreadServer(create_app(service)) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        failed = client.get("/v1/inspections")
        assert failed.status_code == 500, failed.text
        assert failed.headers["connection"] == "close" and "reference" in failed.json()["detail"]
        for leak in ("ZeroDivisionError", "secret", "/srv"):
            assert leak not in failed.text
        assert failed.headers["x-content-type-options"] == "nosniff"
        assert client.get("/v1/models").status_code == 200  # the client reconnects; the server is fine


def test_the_pixel_budget_lets_the_largest_images_through_one_at_a_time() -> None:
    from defectlens.service.limits import Abandoned, Job, PixelBudget, header_pixels

    assert header_pixels(random_png(size=24)) == 24 * 24 and header_pixels(b"not an image") is None
    budget = PixelBudget(100)
    first, second, third = Job(), Job(), Job()
    events: list[str] = []

    def hold(name: str, job: Job, pixels: int | None) -> None:
        with budget.hold(pixels, job):
            events.append(f"{name} in")
            time.sleep(0.4)
            events.append(f"{name} out")

    small = [threading.Thread(target=hold, args=(f"small{i}", Job(), 40)) for i in range(2)]
    for thread in small:  # 40 + 40 <= 100: side by side
        thread.start()
    time.sleep(0.1)
    big = threading.Thread(target=hold, args=("big", first, None))  # unknown size: the whole budget
    big.start()
    for thread in (*small, big):
        thread.join()
    assert set(events[:2]) == {"small0 in", "small1 in"}
    assert events.index("big in") > max(events.index("small0 out"), events.index("small1 out"))
    with budget.hold(100, second):
        third.abandon()
        with pytest.raises(Abandoned):  # a request that gave up stops waiting
            with budget.hold(1, third):
                pass

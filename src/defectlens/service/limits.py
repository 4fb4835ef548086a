"""What a request may cost: the upload size (`UploadLimit`) and the inspection queue
(`InspectionQueue`: bounded concurrency, a queue limit and a time limit per request).

The queue runs inspections (decode, model, pictures, storing) on a fixed pool of worker
threads. At most ``workers + queue`` inspections are admitted at once; one more gets 429 with
``Retry-After``. Each request waits at most ``timeout_s`` for its result: one still waiting
for a worker then gets 503, one already running gets 504, and its work is abandoned - it may
finish in the background (a Python thread cannot be killed), but it will not store anything,
and it keeps its admission slot until it ends, so a flood of slow images turns into 429s,
not into an ever-growing backlog. An inspection that reached its database commit before the
deadline is waited for and answered normally: an acknowledged inspection is always stored,
a refused one never is.

Memory: `PixelBudget` bounds the decoded pixels in memory at once (by default the largest image
a request may send, ``--max-image-megapixels``): small images are inspected side by side, the
largest ones one at a time, so the workers together never hold more than one largest image's
decode, model pass and pictures (about 0.8 GB at 16 megapixels).
"""

from __future__ import annotations

import asyncio
import io
import threading
import warnings
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from defectlens.errors import ConfigError
from defectlens.service.errors import ApiError

T = TypeVar("T")
MULTIPART_SLACK = 64 * 1024  # form fields and boundaries around the image in a request body


def megabytes(size: int) -> str:
    return f"{size / 1048576:.4g} MB"


class UploadLimit:
    """Answers 413 before reading a body whose declared (or streamed) size is over the limit."""

    def __init__(self, app: ASGIApp, max_upload_bytes: int, slack: int = MULTIPART_SLACK) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_body_bytes = max_upload_bytes + slack

    def _message(self) -> str:
        return f"the upload is larger than the limit of {megabytes(self.max_upload_bytes)} (--max-upload-mb)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            status, detail = (413, self._message()) if declared.isdigit() else (400, "invalid Content-Length")
            response = JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise StarletteHTTPException(413, self._message(), headers={"Connection": "close"})
            return message

        await self.app(scope, counted, send)


class Abandoned(Exception):
    """Raised inside a worker when its request gave up waiting: nothing may be stored."""


class Job:
    """One admitted inspection's state: waiting -> running -> committing, or abandoned."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = "waiting"

    def _move(self, allowed: tuple[str, ...], to: str) -> bool:
        with self._lock:
            if self.state not in allowed:
                return False
            self.state = to
            return True

    def start(self) -> None:
        """Called by the worker first; Abandoned if the request already gave up."""
        if not self._move(("waiting",), "running"):
            raise Abandoned()

    def check(self) -> None:
        """Abandoned if the request gave up (called between expensive steps)."""
        if self.state == "abandoned":
            raise Abandoned()

    def commit(self) -> None:
        """Called right before the database commit: from here on the request waits for the result."""
        if not self._move(("running",), "committing"):
            raise Abandoned()

    def abandon(self) -> str | None:
        """The request gives up; returns the state it was in, or None when it is already committing."""
        with self._lock:
            if self.state in ("waiting", "running"):
                previous, self.state = self.state, "abandoned"
                return previous
            return None


def header_pixels(data: bytes) -> int | None:
    """Width x height an image's header claims (Pillow reads the header only), or None when unknown."""
    try:
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        return int(width) * int(height)
    except Exception:  # unreadable headers are the decoder's to refuse; cost them at the maximum
        return None


class PixelBudget:
    """A counting semaphore over decoded pixels: `hold(pixels, job)` waits until that many are free."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self._free = self.capacity
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int | None, job: "Job") -> Iterator[None]:
        amount = self.capacity if pixels is None else min(max(1, int(pixels)), self.capacity)
        with self._changed:
            while self._free < amount:
                self._changed.wait(0.25)
                job.check()  # the request gave up while waiting: stop waiting
            self._free -= amount
        try:
            yield
        finally:
            with self._changed:
                self._free += amount
                self._changed.notify_all()


@dataclass
class QueueStats:
    workers: int
    capacity: int
    admitted: int
    running: int
    abandoned_running: int
    refused: int
    timed_out: int


class InspectionQueue:
    """Bounded, time-limited execution of inspections on `workers` threads (see the module doc)."""

    def __init__(self, workers: int = 2, queue: int = 8, timeout_s: float = 60.0) -> None:
        if int(workers) < 1 or int(queue) < 0:
            raise ConfigError(f"--workers must be >= 1 and --queue-limit >= 0, got {workers} and {queue}")
        if not (timeout_s > 0):
            raise ConfigError(f"--request-timeout must be > 0 seconds, got {timeout_s}")
        self.workers = int(workers)
        self.capacity = int(workers) + int(queue)
        self.timeout_s = float(timeout_s)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="inspect")
        self._lock = threading.Lock()
        self._admitted = 0
        self._running = 0
        self._abandoned_running = 0
        self.refused = 0
        self.timed_out = 0

    def stats(self) -> QueueStats:
        with self._lock:
            return QueueStats(self.workers, self.capacity, self._admitted, self._running, self._abandoned_running,
                              self.refused, self.timed_out)

    def _admit(self) -> bool:
        with self._lock:
            if self._admitted >= self.capacity:
                self.refused += 1
                return False
            self._admitted += 1
            return True

    def _release(self, _future: Future) -> None:
        with self._lock:
            self._admitted -= 1

    def _call(self, job: Job, work: Callable[[Job], T]) -> T:
        job.start()
        with self._lock:
            self._running += 1
        try:
            return work(job)
        finally:
            with self._lock:
                self._running -= 1
                if job.state == "abandoned":
                    self._abandoned_running -= 1

    async def run(self, work: Callable[[Job], T]) -> T:
        """`work(job)` on a worker thread within the limits; ApiError 429 / 503 / 504 otherwise."""
        if not self._admit():
            raise ApiError(429, f"the service is busy ({self.capacity} inspections admitted); try again shortly",
                           headers={"Retry-After": "2"})
        job = Job()
        future = self._executor.submit(self._call, job, work)
        future.add_done_callback(self._release)
        waiting = asyncio.wrap_future(future)
        waiting.add_done_callback(_retrieve)
        try:
            return await asyncio.wait_for(asyncio.shield(waiting), self.timeout_s)
        except asyncio.TimeoutError:
            previous = job.abandon()
            if previous is None:  # committing: the row is being written, the answer is near
                return await waiting
            with self._lock:
                self.timed_out += 1
                if previous == "running":
                    self._abandoned_running += 1
            if previous == "waiting":
                raise ApiError(503, f"the service is busy: no worker was free within {self.timeout_s:g} s "
                                    "(--request-timeout); nothing was stored, try again", headers={"Retry-After": "5"})
            raise ApiError(504, f"the inspection took longer than {self.timeout_s:g} s (--request-timeout); "
                                "nothing was stored") from None
        except Abandoned:  # pragma: no cover - only when the worker saw the deadline first
            raise ApiError(504, f"the inspection took longer than {self.timeout_s:g} s; nothing was stored") from None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _retrieve(future: "asyncio.Future[Any]") -> None:
    """Read an abandoned result's exception so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()

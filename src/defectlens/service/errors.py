"""What a client is told when a request fails: short, generic, bounded messages.

Every error body is ``{"detail": message, **extra}``. Messages never carry SQL, an exception
class, a server path or an unbounded echo of what the client sent: values and names are
shortened (`clip`), decoder details that name exception classes are replaced by a generic
phrase (`image_error`), and the full story goes to the server log only.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from defectlens.errors import ImageFormatError, ImageReadError, ImageTooLargeError

logger = logging.getLogger("defectlens.service")

MAX_ECHO = 60  # characters of a client's value or file name quoted back
MAX_DETAIL = 400  # characters of any message
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_CLASS_NAME = re.compile(r"\b[A-Z]\w*(?:Error|Exception|Warning)\b")
_PATH = re.compile(r"(?:[A-Za-z]:\\|(?<![\w.])/)[\w.\-]+(?:[/\\][\w.\-]+)+")
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


class ApiError(Exception):
    """An error answered as JSON: {"detail": message, **extra} with the given status and headers."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = clip(detail, MAX_DETAIL)
        self.headers = headers or {}
        self.extra = extra


def clip(text: object, limit: int = MAX_ECHO) -> str:
    """`text` as a string with control characters replaced and at most `limit` characters."""
    value = _CONTROL.sub("?", str(text))
    return value if len(value) <= limit else value[: max(limit - 3, 1)] + "..."


def quoted(value: object, limit: int = MAX_ECHO) -> str:
    """A client's value for a message: repr-quoted and shortened."""
    return repr(clip(value, limit))


def image_error(error: ImageReadError, name: str) -> ApiError:
    """The 4xx for an image that cannot be inspected: 413 over a decode limit, 415 otherwise.

    The decoder's reason is kept when it is plain (a format, a size, "NaN pixels", "3 frames")
    and replaced by a generic phrase when it quotes a decoder's exception or a path.
    """
    label = clip(name or "upload")
    if isinstance(error, ImageTooLargeError):
        what = {"max_side": "px on the longest side", "max_pixels": "pixels", "max_decoded_bytes": "decoded bytes",
                "max_file_bytes": "file bytes"}.get(error.limit, "")
        if what and error.value and error.maximum:
            return ApiError(413, f"cannot read image {label}: too large to decode ({error.value:,} {what}; "
                                 f"this service accepts at most {error.maximum:,})")
        return ApiError(413, f"cannot read image {label}: too large to decode (over this service's decode limits)")
    reason = _OBJECT_REPR.sub("", error.reason)
    if _CLASS_NAME.search(reason) or _PATH.search(reason) or len(reason) > 240:
        kind = reason.split("(", 1)[1].split(":", 1)[0] if reason.startswith("not a readable image (") else ""
        kind = kind if kind.isalnum() and len(kind) <= 8 else ""
        reason = f"not a readable image ({kind + ': ' if kind else ''}damaged, truncated or unsupported content)"
    status = 415 if isinstance(error, ImageFormatError) or "readable image" in reason or "format" in reason else 422
    return ApiError(status, f"cannot read image {label}: {reason}")


def validation_message(error: RequestValidationError) -> str:
    """One line from FastAPI's validation errors, each value quoted back shortened."""
    parts = []
    for item in error.errors()[:5]:
        location = ".".join(clip(part, 30) for part in item.get("loc", ()) if part not in ("body", "query", "path", "header"))
        if location == "image":
            parts.append("send the image as a multipart/form-data file field named 'image' (it came as a text field)")
            continue
        message = clip(item.get("msg", "invalid value"), 120)
        value = item.get("input")
        shown = f" (got {quoted(value)})" if value is not None and not isinstance(value, (dict, list, bytes)) else ""
        parts.append(f"{location or 'request'}: {message}{shown}")
    return clip("; ".join(parts) or "invalid request", MAX_DETAIL)


class ErrorGuard:
    """The last line: any exception a route or middleware lets through becomes a generic 500
    (a reference to the server log, nothing else) with ``Connection: close``, so the client
    knows to reconnect instead of finding its next request reset."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            reference = secrets.token_hex(4)
            logger.exception("unexpected error (reference %s) on %s %s", reference, scope.get("method"), scope.get("path"))
            if started:
                raise  # the status line is out: only closing the connection is left
            body = {"detail": f"internal error (reference {reference}; the details are in the server log)"}
            await JSONResponse(body, status_code=500, headers={"Connection": "close"})(scope, receive, send)

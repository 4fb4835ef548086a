"""Access control and browser safety of the service: API tokens, CSRF/origin checks, host
checks and security headers. Pure ASGI middleware, so every route - including routes added
later - is covered without a per-route decorator.

Tokens
    ``--auth-token-file FILE`` holds one token per line as ``ROLE:SHA256`` (the SHA-256 of the
    token, hex; ``#`` starts a comment), written by ``defectlens token``. The tokens themselves
    are never stored. Roles: ``read`` (every GET under ``/v1/``) and ``write`` (also POST,
    i.e. inspecting; write includes read). Clients send ``Authorization: Bearer TOKEN`` or
    ``X-API-Key: TOKEN``. No token -> 401, an unknown token -> 401, a read token on a write
    endpoint -> 403. Without a token file every request is allowed (the default bind is
    127.0.0.1, and ``serve`` refuses another interface without tokens unless told otherwise).
    ``/health``, the UI page, its static files and the API docs need no token.

CSRF
    Tokens travel in a header, never in a cookie, so a foreign page cannot borrow them. A
    state-changing request (not GET/HEAD/OPTIONS) is refused with 403 when the browser says it
    is cross-site (``Sec-Fetch-Site: cross-site`` or ``same-site``), when its ``Origin`` is not
    this service (``--allowed-origin`` adds others), or when it comes from a browser (it has
    an ``Origin`` or ``Sec-Fetch-*`` header) without a token and without the
    ``X-Defectlens-Client`` header that the operator UI sends (a header a foreign form cannot
    set). No CORS headers are ever sent, so browsers keep cross-origin scripts out.

Hosts
    When bound to a loopback address, requests must name a loopback host (``Host:
    127.0.0.1``, ``localhost``, ``[::1]``, plus ``--allowed-host``): a DNS-rebinding page
    cannot reach the service under its own name.

Headers on every response
    ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``, ``Referrer-Policy:
    no-referrer``, ``Cross-Origin-Resource-Policy: same-origin``, a strict
    ``Content-Security-Policy`` (the Swagger page at ``/docs`` allows its inline start-up
    script), and ``Cache-Control: no-store`` on API answers that set none.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from defectlens.errors import ConfigError

ROLES = ("read", "write")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CLIENT_HEADER = "x-defectlens-client"
TOKEN_PREFIX = "dl_"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_LINE = re.compile(r"^(?P<role>[a-z]+):(?P<digest>[0-9a-fA-F]{64})$")

STRICT_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
)


# ---------------------------------------------------------------------------------- tokens
def hash_token(token: str) -> str:
    """SHA-256 hex of a token (what the token file stores)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_line(role: str, token: str, note: str = "") -> str:
    """The token file line of `token`: ``ROLE:SHA256`` (+ ``  # note``)."""
    if role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return f"{role}:{hash_token(token)}" + (f"  # {note}" if note else "")


@dataclass(frozen=True)
class TokenTable:
    """Hashed tokens and their roles, read from a token file."""

    entries: tuple[tuple[str, str], ...]  # (sha256 hex, role)

    @classmethod
    def read(cls, path: str | Path) -> "TokenTable":
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read the token file {file}: {getattr(error, 'strerror', None) or error}") from None
        entries = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            match = _LINE.match(line)
            if not match or match["role"] not in ROLES:
                raise ConfigError(
                    f"{file} line {number}: expected ROLE:SHA256 with ROLE one of {', '.join(ROLES)} "
                    "(write lines with `defectlens token`)"
                )
            entries.append((match["digest"].lower(), match["role"]))
        if not entries:
            raise ConfigError(f"the token file {file} holds no token (add one with `defectlens token --file {file}`)")
        return cls(tuple(entries))

    def role_of(self, token: str | None) -> str | None:
        """The role of a token, or None (every entry compared, in constant time each)."""
        if not token:
            return None
        digest = hash_token(token)
        role = None
        for stored, stored_role in self.entries:
            if hmac.compare_digest(stored, digest):
                role = stored_role if role != "write" else role
        return role


def request_token(headers: dict[bytes, bytes]) -> str | None:
    """The token of a request: ``Authorization: Bearer T`` or ``X-API-Key: T``."""
    authorization = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return key or None


@dataclass(frozen=True)
class SecurityConfig:
    """What `create_app` enforces: tokens (None = open), hosts (None = any), extra origins."""

    tokens: TokenTable | None = None
    allowed_hosts: tuple[str, ...] | None = None
    allowed_origins: tuple[str, ...] = field(default_factory=tuple)

    @property
    def auth_required(self) -> bool:
        return self.tokens is not None


def required_role(method: str, path: str) -> str | None:
    """The role a request needs: None outside /v1/, read for GET/HEAD/OPTIONS, write otherwise."""
    if not path.startswith("/v1/"):
        return None
    return "read" if method in SAFE_METHODS else "write"


def _deny(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------- middleware
class AuthGuard:
    """401/403 by the token's role; puts the role in ``scope["state"]["role"]`` for the routes."""

    def __init__(self, app: ASGIApp, tokens: TokenTable | None) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if self.tokens is None:
            state["role"] = "write"
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        token = request_token(headers)
        role = self.tokens.role_of(token)
        state["role"] = role
        needed = required_role(scope["method"], scope["path"])
        challenge = {"WWW-Authenticate": 'Bearer realm="defectlens"'}
        if needed is not None and role is None:
            detail = "the API token is not valid" if token else \
                "this endpoint needs an API token (Authorization: Bearer TOKEN, or X-API-Key: TOKEN)"
            await _deny(401, detail, challenge)(scope, receive, send)
            return
        if needed == "write" and role != "write":
            await _deny(403, "this token may only read; inspecting needs a token with the write role")(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _netloc(value: str) -> str:
    """host[:port], lower case, default ports dropped, of an origin URL or a Host header."""
    parts = urlsplit(value if "//" in value else f"//{value}")
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        return ""
    host = f"[{host}]" if ":" in host else host
    defaults = {"http": (80,), "https": (443,)}.get(parts.scheme, (80, 443))
    return host if port is None or port in defaults else f"{host}:{port}"


class OriginGuard:
    """Refuses state-changing requests that a foreign web page could have sent (CSRF)."""

    def __init__(self, app: ASGIApp, allowed_origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.allowed = {_netloc(origin) for origin in allowed_origins}

    def problem(self, headers: dict[bytes, bytes]) -> str | None:
        site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
        if site in ("cross-site", "same-site"):
            return f"cross-origin requests may not change anything here (Sec-Fetch-Site: {site})"
        origin = headers.get(b"origin", b"").decode("latin-1").strip()
        if origin:
            own = _netloc(headers.get(b"host", b"").decode("latin-1"))
            netloc = _netloc(origin) if origin != "null" else ""
            if not netloc or (netloc != own and netloc not in self.allowed):
                return "cross-origin requests may not change anything here (Origin is not this service)"
        from_browser = bool(origin) or any(name.startswith(b"sec-fetch-") for name in headers)
        if from_browser and CLIENT_HEADER.encode() not in headers and request_token(headers) is None:
            return "requests from a browser must send the X-Defectlens-Client header (the operator UI does)"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            problem = self.problem(dict(scope.get("headers") or []))
            if problem:
                await _deny(403, problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _hostname(value: str) -> str:
    """The host of a Host header or host name, without the port ("[::1]" for IPv6)."""
    netloc = _netloc(value)
    if netloc.startswith("["):
        return netloc.split("]")[0] + "]"
    return netloc.rsplit(":", 1)[0]


class HostGuard:
    """400 unless the Host header names one of `allowed` (host names, any port)."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = {_hostname(host) for host in allowed}

    def allows(self, host_header: str) -> bool:
        host = _hostname(host_header)
        return bool(host) and host in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not self.allows(host):
                detail = "this service does not answer to that host name (see serve --allowed-host)"
                await _deny(400, detail)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def loopback_hosts(extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The host names a loopback-bound service answers to, plus `extra`."""
    return tuple(dict.fromkeys((*LOOPBACK_HOSTS, *extra)))


class SecurityHeaders:
    """Adds the security headers to every response (CSP relaxed for the Swagger page only)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        csp = (DOCS_CSP if path == "/docs" or path.startswith("/docs-assets") else STRICT_CSP).encode()
        api = path.startswith("/v1/") or path in ("/health", "/openapi.json")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", csp))
                if api and b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)

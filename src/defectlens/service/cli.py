"""`defectlens serve` (load the models, open the inspection log, run the service with uvicorn)
and `defectlens token` (make an API token and its hashed line for ``--auth-token-file``).

Wired into the main CLI with `add_serve_parser(subparsers)` and `add_token_parser(subparsers)`;
serve also runs on its own: ``python -m defectlens.service.cli --model part.dlens``.

``serve`` refuses to listen on a non-loopback interface without ``--auth-token-file`` unless
``--allow-unauthenticated`` says that is intended (e.g. behind an authenticating proxy).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from defectlens.errors import ConfigError, DefectlensError
from defectlens.model_cli import add_model_key_option, use_model_key_file

DEFAULT_STORE = "inspection-store"


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `serve` command to an argparse sub-parser collection; returns its parser."""
    serve = subparsers.add_parser(
        "serve",
        help="run the inspection service (REST API + operator web UI)",
        description="Serve models over HTTP: POST /v1/inspect, the inspection log at /v1/inspections, "
        "the operator UI at / and the API docs at /docs.",
    )
    _add_arguments(serve)
    serve.set_defaults(handler=cmd_serve)
    return serve


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", action="append", required=True, metavar="[NAME=]MODEL",
        help="model file to serve, repeatable; a bare path is named by its file stem; the first is the default",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; another "
                        "interface needs --auth-token-file or --allow-unauthenticated)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--store", default=DEFAULT_STORE,
        help=f"folder for stored images, heat maps, masks and anomaly maps (default ./{DEFAULT_STORE})",
    )
    parser.add_argument(
        "--db", default=None, metavar="URL",
        help="SQLAlchemy database URL for the inspection log (default sqlite:///STORE/inspections.db; "
        "PostgreSQL: postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB)",
    )
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted image upload (default 20)")
    _add_limit_arguments(parser)
    _add_security_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.add_argument("--no-access-log", action="store_true", help="do not log every request")


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    limits = parser.add_argument_group("limits (what one request may cost)")
    limits.add_argument("--max-image-megapixels", type=float, default=16.0,
                        help="largest decoded image, checked from its header before decoding (default 16)")
    limits.add_argument("--workers", type=int, default=2, help="inspections running at once (default 2)")
    limits.add_argument("--queue-limit", type=int, default=8,
                        help="inspections waiting for a worker; more get 429 (default 8)")
    limits.add_argument("--request-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="per inspection, waiting included: 503 if it never started, 504 if it ran over (default 60)")
    limits.add_argument("--max-connections", type=int, default=64,
                        help="open connections and requests at once; more get 503 from the server (default 64)")


def _add_security_arguments(parser: argparse.ArgumentParser) -> None:
    access = parser.add_argument_group("access")
    access.add_argument("--auth-token-file", metavar="FILE", help="API tokens, one ROLE:SHA256 line each "
                        "(written by `defectlens token`); read tokens may GET, write tokens may also inspect")
    access.add_argument("--allow-unauthenticated", action="store_true",
                        help="allow a non-loopback --host without --auth-token-file (e.g. behind an authenticating proxy)")
    access.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                        help="a host name clients may use (Host header); repeatable. Default: any when bound to "
                        "all interfaces, the loopback names when bound to loopback")
    access.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                        help="another web origin allowed to POST (e.g. https://line-3.example), repeatable")
    add_model_key_option(access)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def security_config(args: argparse.Namespace) -> Any:
    """SecurityConfig from the options; ConfigError for an open non-loopback bind."""
    from defectlens.service.security import SecurityConfig, TokenTable, loopback_hosts

    tokens = TokenTable.read(args.auth_token_file) if args.auth_token_file else None
    loopback = _is_loopback(args.host)
    if tokens is None and not loopback and not args.allow_unauthenticated:
        raise ConfigError(
            f"--host {args.host} would let anyone on the network inspect and read the log: give --auth-token-file "
            "(see `defectlens token`), or --allow-unauthenticated behind a proxy that authenticates"
        )
    if loopback:
        hosts: tuple[str, ...] | None = loopback_hosts(tuple(args.allowed_host))
    else:
        hosts = tuple(args.allowed_host) or None
    return SecurityConfig(tokens=tokens, allowed_hosts=hosts, allowed_origins=tuple(args.allowed_origin))


def cmd_serve(args: argparse.Namespace) -> int:
    """Load everything first (a broken model stops here with its file named), then serve."""
    try:
        import uvicorn

        from defectlens.service.app import ServiceLimits, build_service, create_app
    except ImportError as error:
        raise ConfigError(
            f"the service needs the 'service' extra ({error.name} is missing): pip install 'defectlens[service]'"
        ) from None
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be 0..65535, got {args.port}")
    if args.max_connections < 1:
        raise ConfigError(f"--max-connections must be >= 1, got {args.max_connections}")
    logging.getLogger("defectlens").setLevel(args.log_level.upper())
    security = security_config(args)
    use_model_key_file(args)
    limits = ServiceLimits(max_image_megapixels=args.max_image_megapixels, workers=args.workers,
                           queue=args.queue_limit, timeout_s=args.request_timeout)
    service = build_service(args.model, store_dir=args.store, db_url=args.db, max_upload_mb=args.max_upload_mb,
                            limits=limits)
    models = ", ".join(f"{name} ({slot.path})" for name, slot in service.models.items())
    print(f"serving {models}", file=sys.stderr)
    print(f"inspection log: {service.store.describe()}; files: {service.files.root}", file=sys.stderr)
    access = f"API tokens from {args.auth_token_file}" if security.tokens else "no API tokens (anyone who can connect)"
    print(f"access: {access}", file=sys.stderr)
    print(f"operator UI: http://{args.host}:{args.port}/   API docs: http://{args.host}:{args.port}/docs", file=sys.stderr)
    config = uvicorn.Config(
        create_app(service, security), host=args.host, port=args.port, log_level=args.log_level,
        access_log=not args.no_access_log, timeout_graceful_shutdown=10, limit_concurrency=args.max_connections,
        server_header=False,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 2


# ---------------------------------------------------------------------------------- tokens
def add_token_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `token` command to an argparse sub-parser collection; returns its parser."""
    token = subparsers.add_parser(
        "token",
        help="make an API token for `serve --auth-token-file` (prints it once; the file keeps only its hash)",
        description="Make a random API token, print it (once: it is not stored anywhere) and append its line "
        "ROLE:SHA256 to the token file. With --hash, read a token you chose from stdin and print its line.",
    )
    token.add_argument("--role", choices=("read", "write"), default="read",
                       help="read: GET the log and pictures; write: also inspect (default read)")
    token.add_argument("--file", metavar="FILE", help="token file to append the line to (created with mode 600)")
    token.add_argument("--note", default="", help="a comment for the line (who or what uses the token)")
    token.add_argument("--hash", action="store_true", help="hash a token read from stdin instead of making one")
    token.set_defaults(handler=cmd_token)
    return token


def cmd_token(args: argparse.Namespace) -> int:
    from defectlens.service.security import new_token, token_line

    if args.hash:
        secret = sys.stdin.readline().strip()
        if len(secret) < 16:
            raise ConfigError("a token must have at least 16 characters")
    else:
        secret = new_token()
    line = token_line(args.role, secret, args.note.replace("\n", " ").strip())
    if args.file:
        path = Path(args.file)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(descriptor, "a", encoding="utf-8") as out:
            out.write(line + "\n")
        print(f"{args.role} token added to {path}", file=sys.stderr)
    else:
        print(line)
    if not args.hash:
        print(secret)
    return 0


# ---------------------------------------------------------------------------------- log tools
def add_monitor_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `monitor` (the drift monitor over an inspection log, offline)."""
    command = subparsers.add_parser(
        "monitor", help="drift monitor: recent scores in an inspection log vs each model's calibration",
        description="For every model version the log has served: its newest scores against the held-out normal "
        "scores of its calibration (share above the thresholds, KS test, control chart). Exit 1 when one drifts.",
    )
    command.add_argument("--db", required=True, metavar="URL", help="the inspection log's database URL")
    command.add_argument("--model", metavar="NAME", help="only this model name")
    command.add_argument("--window", type=int, default=200, help="recent scores per model (default 200)")
    command.add_argument("--json", action="store_true", help="print the reports as JSON")
    command.set_defaults(handler=cmd_monitor)
    return command


def cmd_monitor(args: argparse.Namespace) -> int:
    import json

    from defectlens.service.monitor import MIN_WINDOW, reports_from_store
    from defectlens.service.store import InspectionStore

    if args.window < MIN_WINDOW:
        raise ConfigError(f"--window must be >= {MIN_WINDOW}, got {args.window}")
    store = InspectionStore(args.db)
    try:
        reports = reports_from_store(store, args.window, args.model)
    finally:
        store.close()
    if not reports:
        raise ConfigError(f"the log {args.db!r} has no served model" + (f" named {args.model!r}" if args.model else ""))
    if args.json:
        print(json.dumps([report.to_dict() for report in reports], indent=2))
    for report in reports if not args.json else ():
        print(f"{report.model} ({report.model_sha256[:12]}): {report.status.upper()}, {report.window} recent scores, "
              f"{report.calibration_size} calibration scores")
        if report.share_above_threshold is not None:
            print(f"  above NOT OK threshold {report.threshold:.4g}: {report.share_above_threshold:.1%} "
                  f"(calibration: up to {report.expected_share_above_threshold:.2%}); KS D {report.ks_statistic:.3f} "
                  f"p {report.ks_p_value:.2g}; EWMA z {report.ewma_z:.2f} (limit {report.ewma_limit:.2f})")
        for alarm in report.alarms:
            print(f"  ! {alarm}")
    return 1 if any(report.status == "drift" for report in reports) else 0


def add_export_reviewed_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `export-reviewed` (operator-reviewed images out of the log, for recalibrate / fit)."""
    command = subparsers.add_parser(
        "export-reviewed", help="copy the images operators reviewed as good (or defect) into a folder",
        description="Copy the stored uploads whose newest operator review is --decision into --out, with "
        "reviewed.json (the audit of each); then e.g. `defectlens recalibrate MODEL --good OUT`.",
    )
    command.add_argument("--db", required=True, metavar="URL", help="the inspection log's database URL")
    command.add_argument("--store", metavar="DIR", help="the service's file store (default: the SQLite file's "
                         f"folder, else ./{DEFAULT_STORE})")
    command.add_argument("--out", required=True, metavar="DIR", help="folder to write the images to")
    command.add_argument("--model", metavar="NAME", help="only inspections of this model name")
    command.add_argument("--decision", choices=("good", "defect"), default="good")
    command.set_defaults(handler=cmd_export_reviewed)
    return command


def cmd_export_reviewed(args: argparse.Namespace) -> int:
    from defectlens.service.reviews import export_reviewed
    from defectlens.service.store import FileStore, InspectionStore, check_db_url

    url = check_db_url(args.db)
    store_dir = args.store
    if store_dir is None:
        database = url.database if url.get_backend_name() == "sqlite" else None
        store_dir = Path(database).parent if database and database != ":memory:" else Path(DEFAULT_STORE)
    store = InspectionStore(args.db)
    try:
        written = export_reviewed(store, FileStore(store_dir), args.out, args.model, args.decision)
    finally:
        store.close()
    print(f"{len(written)} image(s) reviewed as {args.decision!r} written to {args.out} (audit: reviewed.json)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point with the same options as `defectlens serve`."""
    parser = argparse.ArgumentParser(prog="defectlens serve", description="run the defectlens inspection service")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return cmd_serve(args)
    except DefectlensError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

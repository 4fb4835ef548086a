"""`defectlens serve`: load the models, open the inspection log, run the service with uvicorn.

Wired into the main CLI with `add_serve_parser(subparsers)`; also runnable on its own:
``python -m defectlens.service.cli --model part.dlens``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

from defectlens.errors import ConfigError, DefectlensError

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
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--store", default=DEFAULT_STORE,
        help=f"folder for stored images, heat maps, masks and anomaly maps (default ./{DEFAULT_STORE})",
    )
    parser.add_argument(
        "--db", default=None, metavar="URL",
        help="SQLAlchemy database URL for the inspection log (default sqlite:///STORE/inspections.db)",
    )
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted image upload (default 20)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.add_argument("--no-access-log", action="store_true", help="do not log every request")


def cmd_serve(args: argparse.Namespace) -> int:
    """Load everything first (a broken model stops here with its file named), then serve."""
    try:
        import uvicorn

        from defectlens.service.app import build_service, create_app
    except ImportError as error:
        raise ConfigError(
            f"the service needs the 'service' extra ({error.name} is missing): pip install 'defectlens[service]'"
        ) from None
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be 0..65535, got {args.port}")
    logging.getLogger("defectlens").setLevel(args.log_level.upper())
    service = build_service(args.model, store_dir=args.store, db_url=args.db, max_upload_mb=args.max_upload_mb)
    models = ", ".join(f"{name} ({slot.path})" for name, slot in service.models.items())
    print(f"serving {models}", file=sys.stderr)
    print(f"inspection log: {service.store.describe()}; files: {service.files.root}", file=sys.stderr)
    print(f"operator UI: http://{args.host}:{args.port}/   API docs: http://{args.host}:{args.port}/docs", file=sys.stderr)
    config = uvicorn.Config(
        create_app(service),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=not args.no_access_log,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 2


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

"""The operator web UI: one plain HTML/CSS/JS page (no CDN, no build step) over the REST API.

Served at ``/``; its assets at ``/static/`` (this package's ``static/`` folder). Everything the
page shows comes from the public endpoints - the UI holds no logic of its own beyond
re-judging a stored score against the threshold slider.

``/docs`` (Swagger UI) is served from local files too when the ``swagger-ui-py`` package is
installed (it ships Swagger UI 5); without it FastAPI's default page loads Swagger UI from a CDN.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"


def _local_swagger() -> Path | None:
    spec = importlib.util.find_spec("swagger_ui")
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "static"
        if (folder / "swagger-ui-bundle.js").is_file() and (folder / "swagger-ui.css").is_file():
            return folder
    return None


LOCAL_SWAGGER = _local_swagger()


def install(app: FastAPI) -> None:
    """Mount the page at /, its assets at /static and (when available) offline docs at /docs."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    if LOCAL_SWAGGER is not None:
        app.mount("/docs-assets", StaticFiles(directory=LOCAL_SWAGGER), name="docs-assets")

        @app.get("/docs", include_in_schema=False)
        async def docs() -> HTMLResponse:
            return get_swagger_ui_html(
                openapi_url=app.openapi_url or "/openapi.json",
                title=f"{app.title} - API docs",
                swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                swagger_css_url="/docs-assets/swagger-ui.css",
                swagger_favicon_url="/docs-assets/favicon-32x32.png",
            )

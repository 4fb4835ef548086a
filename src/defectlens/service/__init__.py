"""The inspection service: REST API (app), operator web UI (ui) and inspection log (store).

Needs the ``service`` extra (FastAPI, uvicorn, SQLAlchemy): ``pip install 'defectlens[service]'``.

>>> from defectlens.service.app import build_app
>>> app = build_app(["transistor.dlens"], store_dir="inspection-store")   # any ASGI server
"""

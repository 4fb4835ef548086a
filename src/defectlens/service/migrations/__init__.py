"""Alembic migrations of the inspection log's schema (see README.md beside this file).

`defectlens.service.store.migrate` runs them when a store is opened; nothing to do by hand.
"""

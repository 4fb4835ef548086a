"""Alembic environment: runs on the connection `store.migrate` passes in (config.attributes
["connection"]), or on ``sqlalchemy.url`` when Alembic is run from the command line."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set sqlalchemy.url (the inspection log's database URL)")
    with create_engine(url).begin() as own:
        _run(own)


main()

"""Bounded stored pictures (preview and overlay base PNGs, the map's reduction factor) and
client request keys (Idempotency-Key, unique) so a retried upload is stored once.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("inspections", sa.Column("preview_path", sa.String(160), nullable=True))
    op.add_column("inspections", sa.Column("base_path", sa.String(160), nullable=True))
    op.add_column("inspections", sa.Column("map_scale", sa.Integer(), nullable=True))
    op.add_column("inspections", sa.Column("request_key", sa.String(64), nullable=True))
    op.create_index("ux_inspections_request_key", "inspections", ["request_key"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_inspections_request_key", table_name="inspections")
    with op.batch_alter_table("inspections") as batch:
        for column in ("request_key", "map_scale", "base_path", "preview_path"):
            batch.drop_column(column)

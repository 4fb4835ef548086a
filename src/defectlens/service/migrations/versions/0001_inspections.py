"""The inspection log as first released: one row per inspection.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inspections",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_name", sa.String(255)),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("is_anomalous", sa.Boolean(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("image_path", sa.String(160), nullable=False),
        sa.Column("heatmap_path", sa.String(160), nullable=False),
        sa.Column("mask_path", sa.String(160), nullable=False),
        sa.Column("map_path", sa.String(160), nullable=False),
    )
    op.create_index("ix_inspections_created_at", "inspections", ["created_at"])
    op.create_index("ix_inspections_model_created", "inspections", ["model_name", "created_at"])
    op.create_index("ix_inspections_verdict_created", "inspections", ["is_anomalous", "created_at"])


def downgrade() -> None:
    op.drop_table("inspections")

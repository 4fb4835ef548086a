"""Three-state verdicts (OK / REVIEW / NOT OK with the review threshold, p-value, z-score, reasons
and defects of each inspection), the served model versions (their calibration scores, for the
drift monitor) and operator reviews (audited decisions on inspections).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_INSPECTION_COLUMNS = (
    ("verdict", sa.String(8)), ("review_threshold", sa.Float()), ("p_value", sa.Float()), ("z_score", sa.Float()),
    ("reasons", sa.Text()), ("defects", sa.Text()),
)


def upgrade() -> None:
    for name, kind in _INSPECTION_COLUMNS:
        op.add_column("inspections", sa.Column(name, kind, nullable=True))
    # rows before this revision had two states: the verdict follows from is_anomalous
    op.execute("UPDATE inspections SET verdict = CASE WHEN is_anomalous THEN 'NOT OK' ELSE 'OK' END")
    op.create_index("ix_inspections_state_created", "inspections", ["verdict", "created_at"])
    op.create_table(
        "model_versions",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("first_served_at", sa.DateTime(), nullable=False),
        sa.Column("library_version", sa.String(64)),
        sa.Column("method", sa.String(64)),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("review_threshold", sa.Float()),
        sa.Column("target_fpr", sa.Float()),
        sa.Column("review_fpr", sa.Float()),
        sa.Column("rules", sa.Text()),
        sa.Column("normal_scores", sa.Text()),
    )
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("inspection_id", sa.String(32), sa.ForeignKey("inspections.id"), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("operator", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16)),
        sa.Column("note", sa.String(1000)),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("model_library_version", sa.String(64)),
        sa.Column("verdict", sa.String(8), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("review_threshold", sa.Float()),
        sa.Column("rules", sa.Text()),
    )
    op.create_index("ix_reviews_inspection_created", "reviews", ["inspection_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_reviews_inspection_created", table_name="reviews")
    op.drop_table("reviews")
    op.drop_table("model_versions")
    op.drop_index("ix_inspections_state_created", table_name="inspections")
    with op.batch_alter_table("inspections") as batch:
        for name, _ in reversed(_INSPECTION_COLUMNS):
            batch.drop_column(name)

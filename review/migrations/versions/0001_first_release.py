"""The schema of Loupe's first release (what `create_all` made before migrations existed).

A database without an ``alembic_version`` table but with these tables is stamped here, then upgraded.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('images',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('sha256')
    )
    op.create_table('models',
    sa.Column('version', sa.String(length=200), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('vocab', sa.JSON(), nullable=False),
    sa.Column('first_seen', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('version')
    )
    op.create_table('predictions',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('model_version', sa.String(length=200), nullable=False),
    sa.Column('image_sha256', sa.String(length=64), nullable=True),
    sa.Column('predicted', sa.String(length=200), nullable=False),
    sa.Column('probs', sa.JSON(), nullable=False),
    sa.Column('confidence', sa.Float(), nullable=False),
    sa.Column('margin', sa.Float(), nullable=False),
    sa.Column('entropy', sa.Float(), nullable=False),
    sa.Column('latency_ms', sa.Float(), nullable=False),
    sa.Column('width', sa.Integer(), nullable=True),
    sa.Column('height', sa.Integer(), nullable=True),
    sa.Column('brightness', sa.Float(), nullable=True),
    sa.Column('feedback_correct', sa.Boolean(), nullable=True),
    sa.Column('claimed_label', sa.String(length=200), nullable=True),
    sa.Column('loss', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['image_sha256'], ['images.sha256'], ),
    sa.ForeignKeyConstraint(['model_version'], ['models.version'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_predictions_claimed', 'predictions', ['image_sha256'], unique=False, postgresql_where=sa.text('claimed_label IS NOT NULL'), sqlite_where=sa.text('claimed_label IS NOT NULL'))
    op.create_index(op.f('ix_predictions_created'), 'predictions', ['created'], unique=False)
    op.create_index(op.f('ix_predictions_image_sha256'), 'predictions', ['image_sha256'], unique=False)
    op.create_table('queue_items',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('image_sha256', sa.String(length=64), nullable=False),
    sa.Column('prediction_id', sa.String(length=32), nullable=True),
    sa.Column('predicted', sa.String(length=200), nullable=False),
    sa.Column('model_version', sa.String(length=200), nullable=False),
    sa.Column('low_confidence', sa.Boolean(), nullable=False),
    sa.Column('high_loss', sa.Boolean(), nullable=False),
    sa.Column('audit', sa.Boolean(), nullable=False),
    sa.Column('dataset', sa.Boolean(), nullable=False),
    sa.Column('user_flagged', sa.Boolean(), nullable=False),
    sa.Column('priority', sa.Float(), nullable=False),
    sa.Column('status', sa.String(length=8), nullable=False),
    sa.Column('claimed_by', sa.String(length=200), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('required_decisions', sa.Integer(), nullable=False),
    sa.Column('n_decisions', sa.Integer(), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=True),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['prediction_id'], ['predictions.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('image_sha256')
    )
    op.create_index('ix_queue_audit', 'queue_items', ['status', sa.literal_column('priority DESC'), 'id'], unique=False, postgresql_where=sa.text('audit'), sqlite_where=sa.text('audit'))
    op.create_index('ix_queue_claimed', 'queue_items', ['claimed_by'], unique=False, postgresql_where=sa.text('claimed_by IS NOT NULL'), sqlite_where=sa.text('claimed_by IS NOT NULL'))
    op.create_index('ix_queue_dataset', 'queue_items', ['status', sa.literal_column('priority DESC'), 'id'], unique=False, postgresql_where=sa.text('dataset'), sqlite_where=sa.text('dataset'))
    op.create_index('ix_queue_high_loss', 'queue_items', ['status', sa.literal_column('priority DESC'), 'id'], unique=False, postgresql_where=sa.text('high_loss'), sqlite_where=sa.text('high_loss'))
    op.create_index(op.f('ix_queue_items_prediction_id'), 'queue_items', ['prediction_id'], unique=False)
    op.create_index('ix_queue_low_confidence', 'queue_items', ['status', sa.literal_column('priority DESC'), 'id'], unique=False, postgresql_where=sa.text('low_confidence'), sqlite_where=sa.text('low_confidence'))
    op.create_index('ix_queue_model', 'queue_items', ['status', 'model_version', sa.literal_column('priority DESC'), 'id'], unique=False)
    op.create_index('ix_queue_next', 'queue_items', ['status', sa.literal_column('priority DESC'), 'id'], unique=False)
    op.create_index('ix_queue_predicted', 'queue_items', ['status', 'predicted', sa.literal_column('priority DESC'), 'id'], unique=False)
    op.create_index('ix_queue_second', 'queue_items', ['status', 'n_decisions'], unique=False, postgresql_where=sa.text('required_decisions >= 2'), sqlite_where=sa.text('required_decisions >= 2'))
    op.create_index('ix_queue_user_flagged', 'queue_items', ['status', sa.literal_column('priority DESC'), 'id'], unique=False, postgresql_where=sa.text('user_flagged'), sqlite_where=sa.text('user_flagged'))
    op.create_table('decisions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('item_id', sa.Integer(), nullable=False),
    sa.Column('reviewer', sa.String(length=200), nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=True),
    sa.Column('previous_label', sa.String(length=200), nullable=True),
    sa.Column('model_version', sa.String(length=200), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=False),
    sa.Column('reverses_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['item_id'], ['queue_items.id'], ),
    sa.ForeignKeyConstraint(['reverses_id'], ['decisions.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('idempotency_key'),
    sa.UniqueConstraint('reverses_id')
    )
    op.create_index(op.f('ix_decisions_item_id'), 'decisions', ['item_id'], unique=False)
    op.create_index('ix_decisions_reviewer', 'decisions', ['reviewer', 'id'], unique=False)
    op.create_table('reviewer_marks',
    sa.Column('item_id', sa.Integer(), nullable=False),
    sa.Column('reviewer', sa.String(length=200), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.ForeignKeyConstraint(['item_id'], ['queue_items.id'], ),
    sa.PrimaryKeyConstraint('item_id', 'reviewer')
    )

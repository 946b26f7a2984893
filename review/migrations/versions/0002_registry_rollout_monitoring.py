"""Since the first release: the model registry, rollout, monitoring, unfamiliar inputs.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('model_versions',
    sa.Column('version', sa.String(length=200), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('path', sa.String(length=1000), nullable=False),
    sa.Column('vocab', sa.JSON(), nullable=False),
    sa.Column('parent', sa.String(length=200), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('note', sa.String(length=2000), nullable=False),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('recipe', sa.JSON(), nullable=True),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status_changed', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('version'),
    sa.UniqueConstraint('sha256')
    )
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.create_index('ux_model_versions_current', ['status'], unique=True, postgresql_where=sa.text("status = 'current'"), sqlite_where=sa.text("status = 'current'"))

    op.create_table('rollout_actions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('version', sa.String(length=200), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('canary_share', sa.Float(), nullable=True),
    sa.Column('against', sa.String(length=200), nullable=True),
    sa.Column('seen_upto', sa.Integer(), nullable=True),
    sa.Column('gate', sa.JSON(), nullable=True),
    sa.Column('override', sa.String(length=2000), nullable=True),
    sa.Column('note', sa.String(length=2000), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('rollout_actions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rollout_actions_version'), ['version'], unique=False)

    op.create_table('shadow_predictions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('prediction_id', sa.String(length=32), nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('model_version', sa.String(length=200), nullable=False),
    sa.Column('served_version', sa.String(length=200), nullable=False),
    sa.Column('served_label', sa.String(length=200), nullable=False),
    sa.Column('predicted', sa.String(length=200), nullable=False),
    sa.Column('confidence', sa.Float(), nullable=False),
    sa.Column('probs', sa.JSON(), nullable=False),
    sa.Column('agrees', sa.Boolean(), nullable=False),
    sa.Column('latency_ms', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('shadow_predictions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_shadow_predictions_prediction_id'), ['prediction_id'], unique=False)
        batch_op.create_index('ix_shadow_version', ['model_version', 'served_version', 'agrees', 'id'], unique=False)

    op.create_table('model_training_images',
    sa.Column('version', sa.String(length=200), nullable=False),
    sa.Column('image_sha256', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=False),
    sa.Column('split', sa.String(length=5), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.ForeignKeyConstraint(['version'], ['model_versions.version'], ),
    sa.PrimaryKeyConstraint('version', 'image_sha256')
    )
    with op.batch_alter_table('model_training_images', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_training_images_image_sha256'), ['image_sha256'], unique=False)

    op.create_table('model_version_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('version', sa.String(length=200), nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.Column('from_status', sa.String(length=16), nullable=True),
    sa.Column('to_status', sa.String(length=16), nullable=False),
    sa.Column('note', sa.String(length=2000), nullable=False),
    sa.ForeignKeyConstraint(['version'], ['model_versions.version'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('model_version_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_version_events_version'), ['version'], unique=False)

    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('saturation', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('unfamiliar', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('unfamiliar_score', sa.Float(), nullable=True))
        batch_op.create_index('ix_predictions_model_created', ['model_version', 'created'], unique=False)

    with op.batch_alter_table('queue_items', schema=None) as batch_op:
        batch_op.add_column(sa.Column('unfamiliar', sa.Boolean(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('claimed_out_of_domain', sa.Boolean(), server_default='0', nullable=False))
        batch_op.create_index('ix_queue_claimed_out_of_domain', ['status', sa.literal_column('priority DESC'), 'id'], unique=False, postgresql_where=sa.text('claimed_out_of_domain'), sqlite_where=sa.text('claimed_out_of_domain'))
        batch_op.create_index('ix_queue_unfamiliar', ['status', sa.literal_column('priority DESC'), 'id'], unique=False, postgresql_where=sa.text('unfamiliar'), sqlite_where=sa.text('unfamiliar'))

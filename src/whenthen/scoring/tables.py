from __future__ import annotations

from sqlalchemy import Column, Float, Index, String, Table

from whenthen.storage.metadata import BigIntPK, JsonDoc, UTCDateTime, metadata

scoring_models = Table(
    "scoring_models",
    metadata,
    Column("workspace_id", String(40), primary_key=True),
    Column("key", String(80), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("definition", JsonDoc, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

#: A profile's score in a model: ``points`` as of ``as_of``; decay is applied lazily on read
#: (value at t = points decayed from as_of to t), so no nightly rescan is needed.
profile_scores = Table(
    "profile_scores",
    metadata,
    Column("workspace_id", String(40), primary_key=True),
    Column("profile_id", String(40), primary_key=True),
    Column("model_key", String(80), primary_key=True),
    Column("points", Float, nullable=False),
    Column("as_of", UTCDateTime(), nullable=False),
    # Points earned per rule in the current cap period: {"rule-id": [period_start, points]}.
    Column("caps", JsonDoc, nullable=False),
    # When decay alone will carry the score across one of the model's thresholds (a worker
    # step then emits the crossing), and the value it decays from as of that computation.
    Column("decay_due_at", UTCDateTime(), nullable=True),
    Column("decay_from", Float, nullable=True),
    Index("ix_profile_scores_model", "workspace_id", "model_key", "points"),
    Index("ix_profile_scores_decay_due", "decay_due_at"),
)

profile_stages = Table(
    "profile_stages",
    metadata,
    Column("workspace_id", String(40), primary_key=True),
    Column("profile_id", String(40), primary_key=True),
    Column("stage", String(64), nullable=False),
    Column("since", UTCDateTime(), nullable=False),
    Index("ix_profile_stages_stage", "workspace_id", "stage"),
)

stage_history = Table(
    "stage_history",
    metadata,
    Column("id", BigIntPK, primary_key=True, autoincrement=True),
    Column("workspace_id", String(40), nullable=False),
    Column("profile_id", String(40), nullable=False),
    Column("from_stage", String(64), nullable=True),
    Column("to_stage", String(64), nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    Column("source", String(200), nullable=False),
    Index("ix_stage_history_profile", "workspace_id", "profile_id", "at"),
)

#: One lifecycle definition per workspace (ordered stages and the rules that move people).
lifecycles = Table(
    "lifecycles",
    metadata,
    Column("workspace_id", String(40), primary_key=True),
    Column("definition", JsonDoc, nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

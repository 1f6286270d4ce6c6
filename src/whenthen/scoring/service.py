"""Scores and stages: stored, applied to events in the pipeline's transaction. Never commits."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from pydantic import ValidationError
from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from whenthen import profiles
from whenthen.kernel.clock import Clock
from whenthen.kernel.errors import NotFound, invalid_definition
from whenthen.kernel.memo import ByDocument
from whenthen.profiles import Emit
from whenthen.scoring.model import (
    Crossing,
    Lifecycle,
    Score,
    ScoringModel,
    apply,
    crossings_between,
    may_change,
    next_decay_crossing,
    next_stage,
    touches,
    value_at,
)
from whenthen.scoring.tables import lifecycles, profile_scores, profile_stages, scoring_models, stage_history
from whenthen.storage import Database
from whenthen.storage.driver import DriverQuery
from whenthen.storage.id_lists import by_ids, per_dialect

# ---- models -------------------------------------------------------------------------------


def save_model(conn: Connection, ws: str, data: Any, *, now: datetime) -> ScoringModel:
    try:
        model = ScoringModel.model_validate(data)
    except ValidationError as exc:
        raise invalid_definition(exc) from None
    doc = model.model_dump(mode="json")
    exists = conn.execute(
        select(scoring_models.c.key).where(
            scoring_models.c.workspace_id == ws, scoring_models.c.key == model.key
        )
    ).first()
    if exists:
        conn.execute(
            update(scoring_models)
            .where(scoring_models.c.workspace_id == ws, scoring_models.c.key == model.key)
            .values(name=model.name, definition=doc, updated_at=now)
        )
    else:
        conn.execute(
            insert(scoring_models).values(
                workspace_id=ws,
                key=model.key,
                name=model.name,
                definition=doc,
                created_at=now,
                updated_at=now,
            )
        )
    return model


#: Built once: every pipeline batch asks.
_MODELS = (
    select(scoring_models.c.definition)
    .where(scoring_models.c.workspace_id == bindparam("ws"))
    .order_by(scoring_models.c.key)
)
#: Validated models by their document (validation is a function of it alone, and cost
#: more than the read for every batch; the models are frozen).
_validated = ByDocument(ScoringModel.model_validate)


def models(conn: Connection, ws: str) -> list[ScoringModel]:
    return [_validated(doc) for (doc,) in conn.execute(_MODELS, {"ws": ws})]


def delete_model(conn: Connection, ws: str, key: str) -> None:
    result = conn.execute(
        delete(scoring_models).where(scoring_models.c.workspace_id == ws, scoring_models.c.key == key)
    )
    if not result.rowcount:
        raise NotFound("scoring model")
    conn.execute(
        delete(profile_scores).where(profile_scores.c.workspace_id == ws, profile_scores.c.model_key == key)
    )


# ---- scores -------------------------------------------------------------------------------


class _ScoreRow(NamedTuple):
    model_key: str
    points: float
    as_of: datetime
    caps: dict[str, Any]
    decay_due_at: datetime | None
    decay_from: float | None


# All the person's rows (one per model at most: a handful), the models picked in Python:
# an expanding ``IN`` of the keys would be re-rendered at every execution. Read at the
# driver's level: the pipeline reads them for most events.
_ROWS = DriverQuery(
    select(
        profile_scores.c.model_key,
        profile_scores.c.points,
        profile_scores.c.as_of,
        profile_scores.c.caps,
        profile_scores.c.decay_due_at,
        profile_scores.c.decay_from,
    ).where(
        profile_scores.c.workspace_id == bindparam("ws"),
        profile_scores.c.profile_id == bindparam("pid"),
    )
)


def _rows(
    conn: Connection, ws: str, profile_id: str, keys: list[str], held: HeldScores | None = None
) -> dict[str, _ScoreRow]:
    """The person's score rows in these models, by model key (one prebuilt statement, or
    what the batch holds for them)."""
    wanted = set(keys)
    rows = held.rows(ws, profile_id) if held is not None else None
    if rows is None:
        rows = {r[0]: _ScoreRow(*r) for r in _ROWS.all(conn, {"ws": ws, "pid": profile_id})}
        if held is not None:
            held.keep(ws, profile_id, rows)
    return {k: r for k, r in rows.items() if k in wanted}


#: ``_ROWS`` for many people at once (a batch's read-ahead).
_ROWS_OF_MANY = per_dialect(
    lambda d: DriverQuery(
        by_ids(
            d,
            profile_scores,
            "profile_id",
            "pids",
            [profile_scores.c.profile_id, *_ROWS.stmt.selected_columns],
            profile_scores.c.workspace_id == bindparam("ws"),
        )
    )
)


class HeldScores:
    """A pipeline batch's score rows (ADR 0014): read for the batch's people together at
    its start (``prefetch``) or at a person's first event, then kept as the batch writes
    them, so a person's later events read none. The writes themselves stay immediate:
    segments, tag rules and journeys read scores from the database in the same batch.
    Only the scoring step and a merge (``move_to``, after which ``forget``) write score
    rows in a batch."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], dict[str, _ScoreRow]] = {}

    def prefetch(self, conn: Connection, ws: str, profile_ids: list[str]) -> None:
        if not profile_ids:
            return
        found: dict[str, dict[str, _ScoreRow]] = {pid: {} for pid in profile_ids}
        for r in _ROWS_OF_MANY[conn.dialect.name].all(conn, {"ws": ws, "pids": profile_ids}):
            found[r[0]][r[1]] = _ScoreRow(*r[1:])
        for pid, rows in found.items():
            self._rows[(ws, pid)] = rows

    def rows(self, ws: str, profile_id: str) -> dict[str, _ScoreRow] | None:
        return self._rows.get((ws, profile_id))

    def keep(self, ws: str, profile_id: str, rows: dict[str, _ScoreRow]) -> None:
        self._rows[(ws, profile_id)] = rows

    def stored(self, ws: str, profile_id: str, key: str, row: _ScoreRow) -> None:
        rows = self._rows.get((ws, profile_id))
        if rows is not None:
            rows[key] = row

    def values(self, ws: str, profile_id: str, keys: Iterable[str]) -> dict[str, tuple[float, datetime]]:
        """(points, as of) of the person's held rows in these models (those held)."""
        rows = self._rows.get((ws, profile_id)) or {}
        return {k: (float(rows[k].points), rows[k].as_of) for k in keys if k in rows}

    def forget(self) -> None:
        """A merge moved score rows: read them again."""
        self._rows.clear()


def _row(conn: Connection, ws: str, profile_id: str, key: str) -> Any:
    return conn.execute(
        select(profile_scores).where(
            profile_scores.c.workspace_id == ws,
            profile_scores.c.profile_id == profile_id,
            profile_scores.c.model_key == key,
        )
    ).first()


def _score(conn: Connection, ws: str, profile_id: str, key: str) -> Score | None:
    row = _row(conn, ws, profile_id, key)
    return Score.from_row(row.points, row.as_of, row.caps) if row else None


def _store(
    conn: Connection,
    ws: str,
    profile_id: str,
    model: ScoringModel,
    score: Score,
    existed: bool,
    held: HeldScores | None = None,
) -> None:
    """Save the score as of its ``as_of``, with the timer for its next decay crossing."""
    key = model.key
    row = _ScoreRow(
        key,
        score.points,
        score.as_of,
        score.to_json(),
        next_decay_crossing(model, score, score.points),
        score.points,
    )
    values = {f"v_{c}": v for c, v in row._asdict().items() if c != "model_key"}
    params = {"ws": ws, "pid": profile_id, "key": key, **values}
    conn.execute(_UPDATE_SCORE if existed else _INSERT_SCORE, params)
    if held is not None:
        held.stored(ws, profile_id, key, row)


#: ``_store``'s statements, built once: a score is stored for most events of a workspace
#: with scoring models, and building the statement cost more than running it.
_SCORE_VALUES: dict[str, Any] = {
    c: bindparam(f"v_{c}") for c in ("points", "as_of", "caps", "decay_due_at", "decay_from")
}
_UPDATE_SCORE = (
    update(profile_scores)
    .where(
        profile_scores.c.workspace_id == bindparam("ws"),
        profile_scores.c.profile_id == bindparam("pid"),
        profile_scores.c.model_key == bindparam("key"),
    )
    .values(_SCORE_VALUES)
)
_INSERT_SCORE = insert(profile_scores).values(
    workspace_id=bindparam("ws"), profile_id=bindparam("pid"), model_key=bindparam("key"), **_SCORE_VALUES
)


def scores_of(conn: Connection, ws: str, profile_id: str, now: datetime) -> dict[str, float]:
    """Every model's score for the person, decayed to ``now``."""
    out: dict[str, float] = {}
    for model in models(conn, ws):
        score = _score(conn, ws, profile_id, model.key)
        out[model.key] = round(value_at(score, model.decay, now), 6) if score else 0.0
    return out


@dataclass(frozen=True, slots=True)
class Scored:
    crossings: tuple[tuple[str, Crossing], ...]
    stage_change: tuple[str | None, str] | None
    #: The models whose stored score (points, as of) this event changed: the segments on
    #: any other model read the same row as before.
    stored: frozenset[str] = frozenset()


def on_event(
    conn: Connection,
    ws: str,
    profile_id: str,
    *,
    event: str,
    properties: Mapping[str, Any],
    traits_after: Mapping[str, Any],
    now: datetime,
    workspace_models: list[ScoringModel],
    lifecycle: Lifecycle | None,
    held: HeldScores | None = None,
) -> Scored:
    """Apply one event to the person's scores, then to their stage. Only the models the
    event can change are read (one query for all of them); a model it cannot change keeps
    its row untouched (a due decay timer there is fired by the worker step)."""
    crossings: list[tuple[str, Crossing]] = []
    stored: set[str] = set()
    touched = [m for m in workspace_models if touches(m, event, properties)]
    touched_keys = {m.key for m in touched}
    score_rules = lifecycle is not None and any(r.score_model for r in lifecycle.rules)
    wanted = workspace_models if score_rules else touched
    rows = _rows(conn, ws, profile_id, [m.key for m in wanted], held) if wanted else {}
    values: dict[str, float] = {}
    for model in wanted:
        row = rows.get(model.key)
        decay_due = (
            row is not None
            and row.decay_due_at is not None
            and row.decay_from is not None
            and row.decay_due_at <= now
        )
        if (
            not score_rules
            and not decay_due
            and not may_change(
                model, _awarded(row), event=event, properties=properties, traits_after=traits_after
            )
        ):
            # ``apply`` would change nothing (a model with trait rules is touched by every
            # event, most of which change neither its points nor what it awards).
            continue
        before = Score.from_row(row.points, row.as_of, row.caps) if row else None
        values[model.key] = value_at(before, model.decay, now) if before else 0.0
        if model.key not in touched_keys:
            continue
        decayed: tuple[Crossing, ...] = ()
        if decay_due and row is not None and row.decay_from is not None:
            # Decay carried the score across a threshold before this event and the timer
            # has not fired yet: announce that first, as the timer would have.
            decayed = crossings_between(model, float(row.decay_from), values[model.key])
        new, crossed = apply(
            model, before, event=event, properties=properties, traits_after=traits_after, now=now
        )
        if new is not None:
            _store(conn, ws, profile_id, model, new, before is not None, held)
            stored.add(model.key)
            values[model.key] = new.points
        elif decayed and before is not None:
            due_at = _rearm(conn, ws, profile_id, model, before, values[model.key])
            if held is not None and row is not None:
                rearmed = row._replace(decay_due_at=due_at, decay_from=values[model.key])
                held.stored(ws, profile_id, model.key, rearmed)
        crossings.extend((model.key, c) for c in (*decayed, *crossed))
    change = None
    if lifecycle is not None:
        scores = {k: round(v, 6) for k, v in values.items()} if score_rules else {}
        # The stage is read only when some rule holds for this event (the current stage
        # only rules moves out, never in).
        target = None
        if next_stage(lifecycle, None, event=event, properties=properties, scores=scores) is not None:
            current = stage_of(conn, ws, profile_id)
            target = next_stage(lifecycle, current, event=event, properties=properties, scores=scores)
        if target is not None:
            # From the stage just read (``set_stage`` would read it again).
            _write_stage(conn, ws, profile_id, current, target, source=f"rule:{event}", now=now)
            change = (current, target)
    return Scored(tuple(crossings), change, frozenset(stored))


def _awarded(row: _ScoreRow | None) -> tuple[str, ...]:
    """The trait rules a stored score gives (``Score.awarded``), read without the score."""
    if row is None or not row.caps:
        return ()
    return tuple(row.caps.get("awarded") or ())


def _rearm(
    conn: Connection, ws: str, profile_id: str, model: ScoringModel, score: Score, value: float
) -> datetime | None:
    """Count the next decay crossing from ``value`` (the thresholds up to it were
    announced); returns when that is (the timer written)."""
    due_at = next_decay_crossing(model, score, value)
    conn.execute(
        update(profile_scores)
        .where(
            profile_scores.c.workspace_id == ws,
            profile_scores.c.profile_id == profile_id,
            profile_scores.c.model_key == model.key,
        )
        .values(decay_due_at=due_at, decay_from=value)
    )
    return due_at


def crossing_properties(model_key: str, crossing: Crossing) -> dict[str, Any]:
    """The properties of a ``Score Threshold Crossed`` event."""
    return {
        "model": model_key,
        "threshold": crossing.threshold,
        "direction": crossing.direction,
        "score": round(crossing.value, 6),
    }


#: Built once: the worker asks on every pass, mostly to hear there are none.
_DECAY_DUE = (
    select(profile_scores)
    .where(profile_scores.c.decay_due_at <= bindparam("now"))
    .order_by(profile_scores.c.decay_due_at)
    .limit(bindparam("limit"))
)


def fire_decay_timers(conn: Connection, now: datetime, announce: Emit, *, limit: int = 500) -> int:
    """Announce the thresholds that decay alone carried scores across, for the scores whose
    timer is due, and set their next timer. Returns how many timers were handled."""
    due = conn.execute(_DECAY_DUE, {"now": now, "limit": limit}).all()
    if due and conn.dialect.name == "postgresql":
        # As the segment steps (ADR 0011): a person a pipeline batch holds is left due for
        # a later step (their event may be announcing this very crossing and re-arming
        # from rows it read ahead, ADR 0014); the step never waits for a lock.
        free = profiles.lock_free(conn, sorted({row.profile_id for row in due}))
        due = [row for row in due if row.profile_id in free]
    by_ws: dict[str, dict[str, ScoringModel]] = {}
    for row in due:
        if row.workspace_id not in by_ws:
            by_ws[row.workspace_id] = {m.key: m for m in models(conn, row.workspace_id)}
        model = by_ws[row.workspace_id].get(row.model_key)
        score = Score.from_row(row.points, row.as_of, row.caps)
        if model is None:
            _clear_timer(conn, row)
            continue
        value = value_at(score, model.decay, now)
        for crossing in crossings_between(model, float(row.decay_from), value):
            announce(
                conn,
                row.workspace_id,
                row.profile_id,
                "Score Threshold Crossed",
                crossing_properties(model.key, crossing),
                now=now,
                cause=f"score-decay:{row.profile_id}:{row.model_key}:{row.decay_due_at.isoformat()}:{crossing.threshold}",
                at=row.decay_due_at,
            )
        _rearm(conn, row.workspace_id, row.profile_id, model, score, value)
    return len(due)


def _clear_timer(conn: Connection, row: Any) -> None:
    conn.execute(
        update(profile_scores)
        .where(
            profile_scores.c.workspace_id == row.workspace_id,
            profile_scores.c.profile_id == row.profile_id,
            profile_scores.c.model_key == row.model_key,
        )
        .values(decay_due_at=None)
    )


def decay_step(db: Database, clock: Clock, announce: Emit, *, limit: int = 500) -> int:
    """A worker step: fire the due decay timers in one transaction."""
    with db.write() as conn:
        return fire_decay_timers(conn, clock.now(), announce, limit=limit)


# ---- stages -------------------------------------------------------------------------------


def save_lifecycle(conn: Connection, ws: str, data: Any, *, now: datetime) -> Lifecycle:
    try:
        lifecycle = Lifecycle.model_validate(data)
    except ValidationError as exc:
        raise invalid_definition(exc) from None
    doc = lifecycle.model_dump(mode="json")
    if conn.execute(select(lifecycles.c.workspace_id).where(lifecycles.c.workspace_id == ws)).first():
        conn.execute(
            update(lifecycles).where(lifecycles.c.workspace_id == ws).values(definition=doc, updated_at=now)
        )
    else:
        conn.execute(insert(lifecycles).values(workspace_id=ws, definition=doc, updated_at=now))
    return lifecycle


def lifecycle_of(conn: Connection, ws: str) -> Lifecycle | None:
    row = conn.execute(select(lifecycles.c.definition).where(lifecycles.c.workspace_id == ws)).first()
    return Lifecycle.model_validate(row[0]) if row else None


def stage_of(conn: Connection, ws: str, profile_id: str) -> str | None:
    row = conn.execute(_STAGE_OF, {"ws": ws, "pid": profile_id}).first()
    return str(row[0]) if row else None


#: Built once: the pipeline reads a person's stage for every event of a workspace with a
#: lifecycle, and building the statement cost more than running it.
_STAGE_OF = select(profile_stages.c.stage).where(
    profile_stages.c.workspace_id == bindparam("ws"), profile_stages.c.profile_id == bindparam("pid")
)


def move_stage(
    conn: Connection, ws: str, profile_id: str, stage: str, *, source: str, now: datetime, partitions: int
) -> bool:
    """``set_stage``, and when it moved the person, append ``Lifecycle Stage Changed``
    (``from``, ``to``) to their log, as a lifecycle rule's move is announced, so journeys
    can trigger on it. For moves made outside the pipeline (the API, a journey step)."""
    current = stage_of(conn, ws, profile_id)
    if not _write_stage(conn, ws, profile_id, current, stage, source=source, now=now):
        return False
    profiles.emit_event(
        conn,
        ws,
        profile_id,
        "Lifecycle Stage Changed",
        {"from": current, "to": stage},
        message_id=f"wt-sys-{uuid.uuid4().hex}",
        library="whenthen",
        now=now,
        partitions=partitions,
    )
    return True


def set_stage(conn: Connection, ws: str, profile_id: str, stage: str, *, source: str, now: datetime) -> bool:
    """Move the person to ``stage`` (any direction); recorded in the history."""
    return _write_stage(conn, ws, profile_id, stage_of(conn, ws, profile_id), stage, source=source, now=now)


#: Built once: a stage move can come with any event (see ``_store``).
_INSERT_STAGE = insert(profile_stages)
_UPDATE_STAGE = (
    update(profile_stages)
    .where(profile_stages.c.workspace_id == bindparam("ws"), profile_stages.c.profile_id == bindparam("pid"))
    .values(stage=bindparam("b_stage"), since=bindparam("b_since"))
)
_INSERT_STAGE_MOVE = insert(stage_history)


def _write_stage(
    conn: Connection, ws: str, profile_id: str, current: str | None, stage: str, *, source: str, now: datetime
) -> bool:
    if current == stage:
        return False
    if current is None:
        conn.execute(
            _INSERT_STAGE, {"workspace_id": ws, "profile_id": profile_id, "stage": stage, "since": now}
        )
    else:
        conn.execute(_UPDATE_STAGE, {"ws": ws, "pid": profile_id, "b_stage": stage, "b_since": now})
    conn.execute(
        _INSERT_STAGE_MOVE,
        {
            "workspace_id": ws,
            "profile_id": profile_id,
            "from_stage": current,
            "to_stage": stage,
            "at": now,
            "source": source,
        },
    )
    return True


def stage_history_of(conn: Connection, ws: str, profile_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(stage_history)
        .where(stage_history.c.workspace_id == ws, stage_history.c.profile_id == profile_id)
        .order_by(stage_history.c.at, stage_history.c.id)
    )
    return [{"from": r.from_stage, "to": r.to_stage, "at": r.at, "source": r.source} for r in rows]


def funnel(conn: Connection, ws: str) -> dict[str, Any]:
    """People per stage now, and how many ever reached each stage."""
    now_counts: dict[str, int] = dict(
        conn.execute(
            select(profile_stages.c.stage, func.count())
            .where(profile_stages.c.workspace_id == ws)
            .group_by(profile_stages.c.stage)
        ).all()
    )
    reached: dict[str, int] = dict(
        conn.execute(
            select(stage_history.c.to_stage, func.count(func.distinct(stage_history.c.profile_id)))
            .where(stage_history.c.workspace_id == ws)
            .group_by(stage_history.c.to_stage)
        ).all()
    )
    lifecycle = lifecycle_of(conn, ws)
    order = lifecycle.stages if lifecycle else sorted(set(now_counts) | set(reached))
    return {
        "stages": [
            {"stage": s, "now": int(now_counts.get(s, 0)), "ever_reached": int(reached.get(s, 0))}
            for s in order
        ]
    }


def move_to(conn: Connection, ws: str, from_id: str, into_id: str, now: datetime) -> None:
    """On a merge: scores add up (each decayed to now), the survivor keeps the later stage."""
    for model in models(conn, ws):
        theirs = _score(conn, ws, from_id, model.key)
        if theirs is None:
            continue
        mine = _score(conn, ws, into_id, model.key)
        total = value_at(theirs, model.decay, now) + (value_at(mine, model.decay, now) if mine else 0)
        merged = Score(total, now, dict(mine.periods) if mine else {}, mine.awarded if mine else ())
        _store(conn, ws, into_id, model, merged, mine is not None)
    lifecycle = lifecycle_of(conn, ws)
    theirs_stage = stage_of(conn, ws, from_id)
    if theirs_stage is not None:
        mine_stage = stage_of(conn, ws, into_id)
        rank = {s: i for i, s in enumerate(lifecycle.stages)} if lifecycle else {}
        if mine_stage is None or rank.get(theirs_stage, -1) > rank.get(mine_stage, -1):
            set_stage(conn, ws, into_id, theirs_stage, source="merge", now=now)
    forget(conn, ws, [from_id])


def forget(conn: Connection, ws: str, profile_ids: list[str]) -> None:
    conn.execute(
        delete(profile_scores).where(
            profile_scores.c.workspace_id == ws, profile_scores.c.profile_id.in_(profile_ids)
        )
    )
    conn.execute(
        delete(profile_stages).where(
            profile_stages.c.workspace_id == ws, profile_stages.c.profile_id.in_(profile_ids)
        )
    )
    conn.execute(
        delete(stage_history).where(
            stage_history.c.workspace_id == ws, stage_history.c.profile_id.in_(profile_ids)
        )
    )

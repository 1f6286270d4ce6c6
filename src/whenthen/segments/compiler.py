"""Compiling a segment definition to one SQL predicate over ``profiles`` (SQLite and PostgreSQL).

The predicate means exactly what :func:`whenthen.segments.evaluator.evaluate` means for one
profile (``tests/integration/test_segment_compiler.py`` checks them against each other on
generated populations). How the shared rules are kept identical in SQL:

* Every leaf is wrapped in ``coalesce(..., false)``: SQL's unknown never leaks into ``not``.
* JSON values are typed with ``json_type`` (SQLite) / ``jsonb_typeof`` (PostgreSQL); a value
  is read only under a ``CASE`` on its type, so PostgreSQL never casts a string to a number.
* Case-insensitive means ASCII only: ``lower()`` on SQLite (ASCII-only without ICU) and
  ``translate(x, 'A..Z', 'a..z')`` on PostgreSQL (whose ``lower()`` follows the locale).
* Numbers compare as IEEE doubles on both sides.
* Date strings are parsed by integer arithmetic on ``substr`` pieces (no ``julianday``,
  which rounds to milliseconds and accepts 30 February) into epoch microseconds, after a
  shape check (a regular expression on PostgreSQL; on SQLite, digits replaced by ``0``
  and compared with the list of admitted shapes).
* Event times are compared as stored (text in one fixed format on SQLite, ``timestamptz``
  on PostgreSQL); ``ts + within`` is interval arithmetic on PostgreSQL and epoch
  microseconds (``strftime('%s')`` plus the stored microseconds) on SQLite.
* Score decay uses ``power(0.5, x)`` like the evaluator's ``0.5 ** x`` (both call C
  ``pow``), with ``x`` computed from integer microseconds. PostgreSQL has ``power``;
  SQLite has it when built with math functions (3.35+ default builds, Debian, this
  project's CI); :func:`install_sqlite_functions` registers a deterministic Python one on
  an engine whose SQLite lacks it.

Which events count: rows of ``events`` attributed to the profile (``profile_id`` equals
it; the pipeline sets it when it processes the event, whatever the final ``state``) with
``type = 'track'``; pending events are not yet attributed and do not count.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    Double,
    Engine,
    Integer,
    Interval,
    Select,
    String,
    Text,
    and_,
    case,
    cast,
    event,
    exists,
    false,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.expression import FromClause

from whenthen.kernel.durations import parse_duration
from whenthen.lists.tables import list_members
from whenthen.profiles.tables import profile_tags, profiles
from whenthen.scoring.tables import profile_scores, profile_stages
from whenthen.segments.definition import (
    INSTANT_PATTERN,
    NUMERIC_OPS,
    AndCondition,
    EngagementCondition,
    EventCondition,
    EventSpec,
    Filter,
    ListCondition,
    NotCondition,
    Op,
    OrCondition,
    PerformedTimeCondition,
    ScoreCondition,
    SegmentDefinition,
    SequenceCondition,
    StageCondition,
    TagCondition,
    TraitCondition,
    from_us,
    instant_shapes,
    instant_us,
    to_us,
    walk,
)
from whenthen.segments.evaluator import (
    DECAY_EPOCH_US,
    LEAVING_ONLY,
    MAX_HALF_LIVES,
    DecaySpec,
    fold,
    time_direction,
)
from whenthen.storage.id_lists import ids_in
from whenthen.storage.plans import tested_only
from whenthen.tracking.tables import events

_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LOWER = "abcdefghijklmnopqrstuvwxyz"
_MIN = datetime(1, 1, 1, tzinfo=UTC)
_MAX = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)

Bool = ColumnElement[bool]


def _n(value: int) -> ColumnElement[int]:
    """A fixed integer of the arithmetic, written into the SQL as a bigint."""
    return literal_column(str(int(value)), BigInteger)


def _p(value: int) -> ColumnElement[int]:
    """An integer that depends on the definition or on ``now``: a bigint parameter (the
    statement text, and SQLAlchemy's compiled-statement cache entry, stay the same)."""
    return literal(int(value), BigInteger)


def _i(value: int) -> ColumnElement[int]:
    """A small integer constant (a string position: PostgreSQL's ``substr`` takes int4)."""
    return literal_column(str(int(value)), Integer)


def _b(expr: ColumnElement[Any]) -> Bool:
    """Two-valued: unknown (NULL) becomes false."""
    return func.coalesce(expr, false())


def _clamped(us: int) -> datetime:
    """An instant as a datetime, clamped into datetime's range (stored times lie inside it,
    so comparisons with a clamped bound come out the same)."""
    moment = from_us(us)
    if moment is not None:
        return moment
    return _MIN if us < 0 else _MAX


@dataclass
class _Ctx:
    dialect: str
    workspace_id: str
    now: datetime
    half_lives: Mapping[str, DecaySpec]
    now_us: int = 0
    names: count[int] = field(default_factory=count)
    #: Restricted to the profiles of the list parameter ``pids`` (:func:`members_query`'s
    #: ``among``): every set-based subquery reads those people's rows only.
    among: bool = False

    @property
    def pg(self) -> bool:
        return self.dialect == "postgresql"

    def alias(self, table: Any, prefix: str) -> Any:
        return table.alias(f"{prefix}{next(self.names)}")


# ---- JSON values --------------------------------------------------------------------


@dataclass(frozen=True)
class _Val:
    """One JSON value in SQL: its type name (dialect's spelling; NULL when missing) and
    its text (SQLite: the SQL value ``json_extract`` gives; PostgreSQL: ``#>>`` text)."""

    ctx: _Ctx
    type_: ColumnElement[Any]
    text: ColumnElement[Any]

    def present(self) -> Bool:
        return and_(self.type_.is_not(None), self.type_ != "null")

    def is_string(self) -> Bool:
        return self.type_ == ("string" if self.ctx.pg else "text")

    def is_number(self) -> Bool:
        if self.ctx.pg:
            return self.type_ == "number"
        return self.type_.in_(["integer", "real"])

    def is_bool(self, value: bool) -> Bool:
        word = "true" if value else "false"
        if self.ctx.pg:
            return and_(self.type_ == "boolean", self.text == word)
        return self.type_ == word

    def folded(self) -> ColumnElement[Any]:
        s = case((self.is_string(), self.text), else_=None)
        return _fold_sql(self.ctx, s)

    def number(self) -> ColumnElement[Any]:
        return case((self.is_number(), cast(self.text, Double())), else_=None)

    def instant(self) -> ColumnElement[Any]:
        return _instant_sql(self.ctx, case((self.is_string(), self.text), else_=None))


def _fold_sql(ctx: _Ctx, s: ColumnElement[Any]) -> ColumnElement[Any]:
    if ctx.pg:
        return func.translate(s, _UPPER, _LOWER, type_=Text)
    return func.lower(s, type_=Text)


def _path_value(ctx: _Ctx, doc: ColumnElement[Any], segments: Sequence[str]) -> _Val:
    if ctx.pg:
        arr = literal(list(segments), ARRAY(Text))
        return _Val(
            ctx,
            func.jsonb_typeof(doc.op("#>")(arr), type_=Text),
            doc.op("#>>", return_type=Text)(literal(list(segments), ARRAY(Text))),
        )
    path = "$" + "".join(f'."{s}"' for s in segments)
    return _Val(ctx, func.json_type(doc, path, type_=Text), func.json_extract(doc, path))


def _contains_element(ctx: _Ctx, doc: ColumnElement[Any], segments: Sequence[str], expected: Any) -> Bool:
    """The value at the path is an array with an element equal to ``expected``."""
    holder = _path_value(ctx, doc, segments)
    if ctx.pg:
        arr = literal(list(segments), ARRAY(Text))
        tv = (
            func.jsonb_array_elements(doc.op("#>")(arr))
            .table_valued("value")
            .render_derived(name=f"el{next(ctx.names)}")
        )
        element = _Val(
            ctx,
            func.jsonb_typeof(tv.c.value, type_=Text),
            tv.c.value.op("#>>", return_type=Text)(literal([], ARRAY(Text))),
        )
    else:
        path = "$" + "".join(f'."{s}"' for s in segments)
        tv = func.json_each(doc, path).table_valued("type", "value").alias(f"el{next(ctx.names)}")
        element = _Val(ctx, tv.c.type, tv.c.value)
    found = exists(select(_n(1)).select_from(tv).where(_equals(element, expected)).correlate_except(tv))
    # PostgreSQL raises on jsonb_array_elements of a non-array: CASE keeps it from running.
    return case((holder.type_ == "array", found), else_=false())


def _equals(val: _Val, expected: Any) -> Bool:
    if isinstance(expected, bool):
        return _b(val.is_bool(expected))
    if isinstance(expected, int | float):
        return _b(val.number() == literal(float(expected), Double()))
    if isinstance(expected, str):
        return _b(val.folded() == fold(expected))
    return false()


def _predicate(ctx: _Ctx, doc: ColumnElement[Any], segments: Sequence[str], op: Op, expected: Any) -> Bool:
    val = _path_value(ctx, doc, segments)
    if op is Op.EXISTS:
        return _b(val.present())
    if op is Op.NOT_EXISTS:
        return not_(_b(val.present()))
    if op is Op.EQ:
        return _equals(val, expected)
    if op is Op.NE:
        return not_(_equals(val, expected))
    if op is Op.IN:
        return or_(*[_equals(val, e) for e in expected])
    if op is Op.NOT_IN:
        return not_(or_(*[_equals(val, e) for e in expected]))
    if op is Op.CONTAINS:
        in_array = _contains_element(ctx, doc, segments, expected)
        if not isinstance(expected, str):
            return _b(in_array)
        needle = fold(expected)
        pos = func.strpos(val.folded(), needle) if ctx.pg else func.instr(val.folded(), needle)
        return or_(_b(pos > 0), _b(in_array))
    if op is Op.STARTS_WITH:
        prefix = fold(expected)
        return _b(func.substr(val.folded(), 1, len(prefix)) == prefix)
    if op in NUMERIC_OPS:
        number = val.number()
        bound: ColumnElement[float] = literal(float(expected), Double())
        cmp = {Op.GT: number > bound, Op.GTE: number >= bound, Op.LT: number < bound, Op.LTE: number <= bound}
        return _b(cmp[op])
    return _b(_date_sql(ctx, val.instant(), op, expected))


def _date_sql(ctx: _Ctx, t: ColumnElement[Any], op: Op, value: str) -> ColumnElement[Any]:
    """A date operator on an epoch-microseconds expression."""
    if op is Op.BEFORE:
        return t < _p(_required_us(value))
    if op is Op.AFTER:
        return t > _p(_required_us(value))
    d = parse_duration(value) // timedelta(microseconds=1)
    now = ctx.now_us
    if op is Op.WITHIN_LAST:
        return t.between(_p(now - d), _p(now))
    if op is Op.WITHIN_NEXT:
        return t.between(_p(now), _p(now + d))
    if op is Op.OLDER_THAN:
        return t < _p(now - d)
    raise ValueError(f"not a date operator: {op}")


def _required_us(value: str) -> int:
    us = instant_us(value)
    assert us is not None  # validated with the definition
    return us


# ---- instants in SQL ----------------------------------------------------------------


def _instant_sql(ctx: _Ctx, text: ColumnElement[Any]) -> ColumnElement[Any]:
    """Epoch microseconds of a string in the accepted shape, else NULL (mirrors
    :func:`whenthen.segments.definition.instant_us`).

    The string is named once in a one-row derived table, ``(SELECT .. FROM (SELECT
    <text> AS s) AS ds)``, so the arithmetic below refers to ``ds.s`` instead of repeating
    the JSON extraction dozens of times."""
    ds = select(text.label("s")).correlate_except(None).subquery(f"ds{next(ctx.names)}")
    s: ColumnElement[Any] = ds.c.s
    if ctx.pg:
        shaped: Bool = s.op("~", return_type=Boolean)("^" + INSTANT_PATTERN + "$")
    else:
        shape: ColumnElement[Any] = s
        for ch in "123456789":
            shape = func.replace(shape, ch, "0")
        shape = func.replace(func.replace(shape, " ", "T"), "+", "-")
        shaped = shape.in_(instant_shapes())

    def piece(start: Any, length: int) -> ColumnElement[Any]:
        return func.substr(s, start, _i(length), type_=String)

    def num(start: Any, length: int) -> ColumnElement[Any]:
        return cast(piece(start if not isinstance(start, int) else _i(start), length), BigInteger)

    n = func.length(s, type_=Integer)
    y, mo, d = num(1, 4), num(6, 2), num(9, 2)
    timed = n > _i(10)
    has_z = piece(n, 1) == "Z"
    sign_char = piece(n - _i(5), 1)
    has_off = and_(n > _i(16), sign_char.in_(["+", "-"]))
    body = n - case((has_z, _i(1)), (has_off, _i(6)), else_=_i(0))
    hh = case((timed, num(12, 2)), else_=_n(0))
    mi = case((timed, num(15, 2)), else_=_n(0))
    ss = case((and_(timed, body >= _i(19)), num(18, 2)), else_=_n(0))
    frac_text = func.substr(
        func.substr(s, _i(21), body - _i(20), type_=String).op("||")("000000"), _i(1), _i(6), type_=String
    )
    frac = case((and_(timed, body > _i(20)), cast(frac_text, BigInteger)), else_=_n(0))
    oh = case((has_off, num(n - _i(4), 2)), else_=_n(0))
    om = case((has_off, num(n - _i(1), 2)), else_=_n(0))
    off = case((sign_char == "-", _n(-1)), else_=_n(1)) * (oh * _n(60) + om)

    leap = or_(and_(y % _n(4) == _n(0), y % _n(100) != _n(0)), y % _n(400) == _n(0))
    dim = case(
        (mo == _n(2), case((leap, _n(29)), else_=_n(28))),
        (mo.in_([_n(4), _n(6), _n(9), _n(11)]), _n(30)),
        else_=_n(31),
    )
    valid = and_(
        y >= _n(1),
        mo.between(_n(1), _n(12)),
        d.between(_n(1), dim),
        hh <= _n(23),
        mi <= _n(59),
        ss <= _n(59),
        oh <= _n(23),
        om <= _n(59),
    )
    days = _days_from_civil_sql(y, mo, d)
    minutes = (days * _n(24) + hh) * _n(60) + mi - off
    epoch = (minutes * _n(60) + ss) * _n(1_000_000) + frac
    # Nested CASEs: PostgreSQL must not cast the pieces of a string of another shape.
    value = case((shaped, case((valid, epoch), else_=None)), else_=None)
    return select(value).select_from(ds).scalar_subquery()


def _days_from_civil_sql(
    y: ColumnElement[Any], m: ColumnElement[Any], d: ColumnElement[Any]
) -> ColumnElement[Any]:
    """:func:`whenthen.segments.definition.days_from_civil` in SQL (non-negative operands
    only, so truncating integer division is floor division)."""
    yy = y - case((m <= _n(2), _n(1)), else_=_n(0))
    era = yy // _n(400)
    yoe = yy - era * _n(400)
    mp = case((m > _n(2), m - _n(3)), else_=m + _n(9))
    doy = (mp * _n(153) + _n(2)) // _n(5) + d - _n(1)
    doe = yoe * _n(365) + yoe // _n(4) - yoe // _n(100) + doy
    return era * _n(146097) + doe - _n(719468)


def _ts_us_pg(col: ColumnElement[Any]) -> ColumnElement[Any]:
    """Epoch microseconds of a ``timestamptz``, exact whether ``extract`` returns numeric
    (PostgreSQL 14+) or double precision (older): whole seconds and the microseconds of
    the minute are both integers a double holds exactly."""
    seconds = cast(func.extract("epoch", func.date_trunc("second", col)), BigInteger)
    micros = cast(func.extract("microseconds", col), BigInteger) % _n(1_000_000)
    return seconds * _n(1_000_000) + micros


def _ts_us_sqlite(col: ColumnElement[Any]) -> ColumnElement[Any]:
    """Epoch microseconds of a timestamp stored by SQLAlchemy on SQLite
    (``YYYY-MM-DD HH:MM:SS.ffffff``, naive UTC)."""
    # Whole seconds only: SQLite rounds fractions to milliseconds (59.9999995 -> next second).
    seconds = cast(func.strftime("%s", func.substr(col, _i(1), _i(19))), BigInteger)
    micros = cast(func.substr(col, _i(21), _i(6), type_=String), BigInteger)
    return seconds * _n(1_000_000) + micros


# ---- conditions ---------------------------------------------------------------------


def _event_rows(
    ctx: _Ctx, e: Any, spec_event: str, where: Sequence[Filter], *, of: ColumnElement[Any] | None = None
) -> list[Bool]:
    """The conditions on one alias of ``events`` for an event spec: the track events of
    that name and those filters in the workspace, attributed to a profile (the set-based
    form, ``of`` None; with ``ctx.among``, to one of the listed profiles), or to the
    profile ``of`` names (a subquery correlated to it).

    In the correlated form on SQLite the workspace is tested as ``+workspace_id``: a unary
    plus keeps SQLite (no statistics) from searching ``ix_events_workspace_event_time``
    for it, a scan of every event of that name per outer row, instead of
    ``ix_events_profile_time`` (the person's events only). The restricted form does the
    same: the listed people's events, not every event of the name."""
    workspace: ColumnElement[Any] = e.c.workspace_id
    if of is not None or ctx.among:
        workspace = tested_only(ctx.dialect, workspace)
    person: Bool
    if of is not None:
        person = e.c.profile_id == of
    elif ctx.among:
        person = ids_in(ctx.dialect, e.c.profile_id, "pids")
    else:
        person = e.c.profile_id.is_not(None)
    conds: list[Bool] = [
        person,
        workspace == ctx.workspace_id,
        e.c.type == "track",
        e.c.event == spec_event,
    ]
    for f in where:
        conds.append(_predicate(ctx, e.c.payload, ["properties", *f.path.split(".")], f.op, f.value))
    return conds


def _subquery(what: Any, frm: FromClause, conds: Sequence[Bool]) -> Select[Any]:
    return select(what).select_from(frm).where(*conds).correlate_except(frm)


def _profiles_in(e: Any, conds: Sequence[Bool], having: Bool | None = None) -> Bool:
    """``profiles.id IN (SELECT e.profile_id ...)``: the people with matching rows (with
    ``having`` over each person's group). Set-based: the subquery is run once, over the
    rows of one event name (``ix_events_workspace_event_time``), not once per profile.
    Its rows are never NULL (``_event_rows``), so the test is two-valued."""
    sub = select(e.c.profile_id).select_from(e).where(*conds)
    if having is not None:
        sub = sub.group_by(e.c.profile_id).having(having)
    return profiles.c.id.in_(sub)


def _event_condition(ctx: _Ctx, cond: EventCondition) -> Bool:
    e = ctx.alias(events, "ev")
    conds = _event_rows(ctx, e, cond.event, cond.where)
    if cond.within_last is not None:
        conds += [e.c.timestamp >= ctx.now - parse_duration(cond.within_last), e.c.timestamp <= ctx.now]
    if cond.from_ is not None:
        conds.append(e.c.timestamp >= _clamped(_required_us(cond.from_)))
    if cond.to is not None:
        conds.append(e.c.timestamp < _clamped(_required_us(cond.to)))
    low, high = cond.count_bounds()
    n = func.count()
    if low == 0:
        if high is None:
            return true()
        # at most ``high``: not among those with more (none at all counts as zero)
        return not_(_profiles_in(e, conds, None if high == 0 else n > high))
    if (low, high) == (1, None):
        return _profiles_in(e, conds)
    return _profiles_in(e, conds, n >= low if high is None else and_(n >= low, n <= high))


def _performed_time(ctx: _Ctx, cond: PerformedTimeCondition) -> Bool:
    """The first or last time as an aggregate per person, compared in ``HAVING``: a person
    without such an event has no group, so the test is false for them, as the evaluator's
    is when the time is missing."""
    e = ctx.alias(events, "ev")
    t = func.min(e.c.timestamp) if cond.kind == "first_performed" else func.max(e.c.timestamp)
    op = Op(cond.op)
    test: Bool
    if op is Op.BEFORE:
        test = t < _clamped(_required_us(cond.value))
    elif op is Op.AFTER:
        test = t > _clamped(_required_us(cond.value))
    else:
        d = parse_duration(cond.value) // timedelta(microseconds=1)
        now = ctx.now_us
        if op is Op.WITHIN_LAST:
            test = and_(t >= _clamped(now - d), t <= ctx.now)
        elif op is Op.WITHIN_NEXT:
            test = and_(t >= ctx.now, t <= _clamped(now + d))
        else:
            test = t < _clamped(now - d)
    return _profiles_in(e, _event_rows(ctx, e, cond.event, cond.where), test)


def _within(ctx: _Ctx, a: Any, b: Any, within: timedelta) -> Bool:
    """``b.timestamp <= a.timestamp + within``, exact to the microsecond.

    On PostgreSQL the interval is a number of microseconds: an interval of days (what a
    ``timedelta`` becomes) added to a ``timestamptz`` is a calendar day in the session's
    time zone, 23 or 25 hours across a daylight-saving change."""
    us = within // timedelta(microseconds=1)
    if ctx.pg:
        step = literal_column("interval '1 microsecond'", Interval)
        later: Bool = b.c.timestamp <= a.c.timestamp + step.op("*", return_type=Interval)(_p(us))
        return later
    return _ts_us_sqlite(b.c.timestamp) <= _ts_us_sqlite(a.c.timestamp) + _p(us)


def _sequence(ctx: _Ctx, cond: SequenceCondition) -> Bool:
    """The people with a ``first`` event (set-based) followed, or not, by a ``then`` event
    of their own (correlated to that first event: ``ix_events_profile_time``)."""
    a = ctx.alias(events, "sa")
    b = ctx.alias(events, "sb")
    a_conds = _event_rows(ctx, a, cond.first.event, cond.first.where)
    if cond.first_within_last is not None:
        w = parse_duration(cond.first_within_last)
        a_conds += [a.c.timestamp >= ctx.now - w, a.c.timestamp <= ctx.now]
    spec: EventSpec | None = cond.then if cond.then is not None else cond.then_not
    assert spec is not None
    within = parse_duration(cond.within) if cond.within is not None else None
    b_conds = [*_event_rows(ctx, b, spec.event, spec.where, of=a.c.profile_id), b.c.timestamp > a.c.timestamp]
    if within is not None:
        b_conds.append(_within(ctx, a, b, within))
    followed = exists(_subquery(_n(1), b, b_conds))
    if cond.then is not None:
        return _profiles_in(a, [*a_conds, followed])
    assert within is not None
    return _profiles_in(a, [*a_conds, a.c.timestamp <= ctx.now - within, not_(followed)])


def _score(ctx: _Ctx, cond: ScoreCondition) -> Bool:
    s = ctx.alias(profile_scores, "sc")
    decay = ctx.half_lives.get(cond.model)
    value: ColumnElement[Any]
    if decay is None:
        value = s.c.points
    elif isinstance(decay, tuple):
        value = _fixed_decay(ctx, s, *decay)
    else:
        h = decay // timedelta(microseconds=1)
        if h <= 0:
            raise ValueError("a half-life must be positive")
        as_of_us = _ts_us_pg(s.c.as_of) if ctx.pg else _ts_us_sqlite(s.c.as_of)
        dt = _p(ctx.now_us) - as_of_us
        x = cast(case((dt > _n(0), dt), else_=_n(0)), Double()) / cast(_p(h), Double())
        value = case(
            (x >= literal(MAX_HALF_LIVES, Double()), literal(0.0, Double())),
            else_=s.c.points * func.power(literal(0.5, Double()), x, type_=Double()),
        )
    conds = [
        s.c.workspace_id == ctx.workspace_id,
        s.c.profile_id == profiles.c.id,
        s.c.model_key == cond.model,
    ]
    score = func.coalesce(_subquery(value, s, conds).scalar_subquery(), literal(0.0, Double()))
    bound: ColumnElement[float] = literal(float(cond.value), Double())
    cmp = {"gt": score > bound, "gte": score >= bound, "lt": score < bound, "lte": score <= bound}
    return _b(cmp[cond.op])


def _floor_div(a: ColumnElement[Any], b: int) -> ColumnElement[Any]:
    """``floor(a / b)`` for a bigint ``a`` and a positive ``b`` (SQL's ``/`` truncates)."""
    return case((a >= _n(0), a // _p(b)), else_=-((-a + _p(b - 1)) // _p(b)))


def _fixed_decay(ctx: _Ctx, s: Any, amount: float, period: timedelta) -> ColumnElement[Any]:
    """The score less ``amount`` per period boundary passed since ``as_of``, never past 0,
    as the evaluator's ``score_value``: ``copysign(max(0, |p| - amount * n), p)``."""
    p_us = period // timedelta(microseconds=1)
    if p_us <= 0:
        raise ValueError("a decay period must be positive")
    as_of_us = _ts_us_pg(s.c.as_of) if ctx.pg else _ts_us_sqlite(s.c.as_of)
    now_index = (ctx.now_us - DECAY_EPOCH_US) // p_us
    n = _p(now_index) - _floor_div(as_of_us - _p(DECAY_EPOCH_US), p_us)
    steps = case((n > _n(0), n), else_=_n(0))
    taken: ColumnElement[float] = literal(float(amount), Double()) * cast(steps, Double())
    points: ColumnElement[float] = cast(s.c.points, Double())
    zero: ColumnElement[float] = literal(0.0, Double())
    down, up = points - taken, points + taken
    return case(
        (points >= zero, case((down > zero, down), else_=zero)),
        else_=case((up < zero, up), else_=zero),
    )


def _condition(ctx: _Ctx, cond: Any) -> Bool:
    if isinstance(cond, AndCondition):
        return and_(*[_condition(ctx, c) for c in cond.conditions])
    if isinstance(cond, OrCondition):
        return or_(*[_condition(ctx, c) for c in cond.conditions])
    if isinstance(cond, NotCondition):
        return not_(_condition(ctx, cond.condition))
    if isinstance(cond, TraitCondition):
        return _predicate(ctx, profiles.c.traits, cond.path.split("."), cond.op, cond.value)
    if isinstance(cond, EventCondition):
        return _event_condition(ctx, cond)
    if isinstance(cond, EngagementCondition):
        return or_(*[_event_condition(ctx, c) for c in cond.as_events()])
    if isinstance(cond, PerformedTimeCondition):
        return _performed_time(ctx, cond)
    if isinstance(cond, SequenceCondition):
        return _sequence(ctx, cond)
    if isinstance(cond, ListCondition):
        m = list_members.alias(f"m{next(ctx.names)}")
        return exists(
            _subquery(
                _n(1),
                m,
                [
                    m.c.workspace_id == ctx.workspace_id,
                    m.c.profile_id == profiles.c.id,
                    m.c.list_key == cond.list,
                ],
            )
        )
    if isinstance(cond, TagCondition):
        t = profile_tags.alias(f"m{next(ctx.names)}")
        return exists(
            _subquery(
                _n(1),
                t,
                [t.c.workspace_id == ctx.workspace_id, t.c.profile_id == profiles.c.id, t.c.tag == cond.tag],
            )
        )
    if isinstance(cond, StageCondition):
        st = profile_stages.alias(f"m{next(ctx.names)}")
        return exists(
            _subquery(
                _n(1),
                st,
                [
                    st.c.workspace_id == ctx.workspace_id,
                    st.c.profile_id == profiles.c.id,
                    st.c.stage.in_(list(cond.in_)),
                ],
            )
        )
    if isinstance(cond, ScoreCondition):
        return _score(ctx, cond)
    raise TypeError(f"unknown condition: {cond!r}")


def compile_segment(
    definition: SegmentDefinition,
    *,
    workspace_id: str,
    now: datetime,
    dialect_name: str,
    half_lives: Mapping[str, DecaySpec] | None = None,
    among: bool = False,
) -> Bool:
    """A predicate over ``profiles``: the profile is in ``workspace_id``, not merged away,
    and in the segment at ``now``. ``half_lives`` gives the decay of each scoring model
    (absent or ``None``: no decay), as in :class:`whenthen.segments.evaluator.ProfileView`.

    With ``among``, the profile is also one of the ids of the list parameter ``pids``
    (``storage.id_lists.ids_in``: bind it as a list), and every set-based subquery reads
    only those people's rows: the answer for a batch of people (a timer batch) costs
    their rows, not a pass over the population. For a listed profile the answer is the
    same either way: a subquery over one person's rows holds the same rows for them."""
    ctx = _context(dialect_name, workspace_id, now, half_lives, among)
    return _population(ctx, _condition(ctx, definition.condition))


def _context(
    dialect_name: str,
    workspace_id: str,
    now: datetime,
    half_lives: Mapping[str, DecaySpec] | None,
    among: bool,
) -> _Ctx:
    if dialect_name not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported dialect: {dialect_name}")
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    ctx = _Ctx(
        dialect=dialect_name, workspace_id=workspace_id, now=now, half_lives=half_lives or {}, among=among
    )
    ctx.now_us = to_us(now)
    return ctx


def _population(ctx: _Ctx, condition: Bool) -> Bool:
    """The profiles of the workspace, not merged away (and listed, with ``ctx.among``),
    for which ``condition`` holds."""
    workspace: ColumnElement[Any] = profiles.c.workspace_id
    if ctx.among:
        # As in ``_event_rows``: SQLite (no statistics) would otherwise walk the whole
        # workspace in ``ix_profiles_workspace_last_seen`` rather than probe the listed ids.
        workspace = tested_only(ctx.dialect, workspace)
    terms = [workspace == ctx.workspace_id, profiles.c.merged_into.is_(None)]
    if ctx.among:
        terms.append(ids_in(ctx.dialect, profiles.c.id, "pids"))
    return and_(*terms, condition)


def members_query(
    definition: SegmentDefinition,
    *,
    workspace_id: str,
    now: datetime,
    dialect_name: str,
    half_lives: Mapping[str, DecaySpec] | None = None,
    among: bool = False,
) -> Select[str]:
    """``SELECT profiles.id`` of every member of the segment in the workspace at ``now``
    (with ``among``: of those listed in the parameter ``pids``, see :func:`compile_segment`)."""
    predicate = compile_segment(
        definition,
        workspace_id=workspace_id,
        now=now,
        dialect_name=dialect_name,
        half_lives=half_lives,
        among=among,
    )
    return select(profiles.c.id).where(predicate)


def timer_candidates_query(
    definition: SegmentDefinition,
    *,
    workspace_id: str,
    now: datetime,
    dialect_name: str,
    half_lives: Mapping[str, DecaySpec] | None = None,
    among: bool = False,
) -> Select[str] | None:
    """``SELECT profiles.id`` of the profiles for which
    :func:`whenthen.segments.evaluator.next_change` may answer an instant (a superset:
    every other profile's answer is ``None``), or ``None`` when the definition has no leaf
    that time alone changes. Per time-dependent leaf (the instants are in
    ``docs/design/segments.md``, "next_change"):

    * a relative date on a trait: the trait is present;
    * an event or engagement window ``within_last d``: an event of that name at or after
      ``now - d`` (an older one entered and left the window before ``now``);
    * ``first_performed`` / ``last_performed`` with a relative operator over ``d``: an event
      of that name at or after ``now - d`` (the first or last time is one of them);
    * a sequence with ``first_within_last w`` and/or a ``then_not`` wait ``W``: a ``first``
      event at or after ``now - max(w, W)``;
    * a score in a model with a half-life: a score row in that model.

    The events are those the leaf counts, its ``where`` filters included (a leaf changes
    by time only when one of its own events enters or leaves a window); each is one
    set-based ``IN`` over ``ix_events_workspace_event_time``.

    When time can move people only one way (:func:`whenthen.segments.evaluator.time_direction`),
    only the current members (or only the non-members) among those are candidates, and
    everyone with a future-dated event of a time-dependent leaf (it will enter a window).

    ``among``: of the profiles listed in the parameter ``pids`` only (:func:`compile_segment`)."""
    ctx = _context(dialect_name, workspace_id, now, half_lives, among)
    relative = (Op.WITHIN_LAST, Op.WITHIN_NEXT, Op.OLDER_THAN)
    # (event name, its filters as JSON) -> (the filters, the earliest instant (us) that matters)
    since: dict[tuple[str, str], tuple[Sequence[Filter], int]] = {}

    def recent(name: str, where: Sequence[Filter], d: timedelta) -> None:
        at = ctx.now_us - d // timedelta(microseconds=1)
        key = (name, "[" + ",".join(f.model_dump_json() for f in where) + "]")
        since[key] = (where, min(since.get(key, (where, at))[1], at))

    parts: list[Bool] = []
    for cond in walk(definition.condition):
        if isinstance(cond, TraitCondition) and cond.op in relative:
            parts.append(_predicate(ctx, profiles.c.traits, cond.path.split("."), Op.EXISTS, None))
        elif isinstance(cond, EventCondition | EngagementCondition):
            for c in cond.as_events() if isinstance(cond, EngagementCondition) else (cond,):
                if c.within_last is not None:
                    recent(c.event, c.where, parse_duration(c.within_last))
        elif isinstance(cond, PerformedTimeCondition) and Op(cond.op) in relative:
            recent(cond.event, cond.where, parse_duration(cond.value))
        elif isinstance(cond, SequenceCondition):
            waits = [
                parse_duration(w)
                for w in (cond.first_within_last, cond.within if cond.then_not else None)
                if w
            ]
            if waits:
                recent(cond.first.event, cond.first.where, max(waits))
        elif isinstance(cond, ScoreCondition) and ctx.half_lives.get(cond.model) is not None:
            s = ctx.alias(profile_scores, "sc")
            parts.append(
                exists(
                    _subquery(
                        _n(1),
                        s,
                        [
                            s.c.workspace_id == workspace_id,
                            s.c.profile_id == profiles.c.id,
                            s.c.model_key == cond.model,
                        ],
                    )
                )
            )
    for (name, _), (where, at) in since.items():
        e = ctx.alias(events, "ev")
        parts.append(_profiles_in(e, [*_event_rows(ctx, e, name, where), e.c.timestamp >= _clamped(at)]))
    if not parts:
        return None
    candidates = or_(*parts)
    direction = time_direction(definition, ctx.half_lives)
    if direction is not None:
        # Time alone moves people one way only, unless an event of theirs lies ahead:
        # members (or non-members) with a time-dependent event, and anyone with a future one.
        future: list[Bool] = []
        for (name, _), (where, _at) in since.items():
            f = ctx.alias(events, "ev")
            future.append(_profiles_in(f, [*_event_rows(ctx, f, name, where), f.c.timestamp > ctx.now]))
        member = _condition(ctx, definition.condition)
        side = member if direction == LEAVING_ONLY else not_(member)
        candidates = or_(and_(side, candidates), *future)
    return select(profiles.c.id).where(_population(ctx, candidates))


# ---- SQLite without math functions --------------------------------------------------


def _power(x: float | None, y: float | None) -> float | None:
    if x is None or y is None:
        return None
    return math.pow(x, y)


def add_sqlite_functions(dbapi_connection: sqlite3.Connection) -> bool:
    """Register a deterministic ``power`` on a SQLite connection that lacks it (SQLite
    built without math functions); True when it was registered."""
    try:
        dbapi_connection.execute("SELECT power(2.0, 3.0)").fetchone()
        return False
    except sqlite3.OperationalError:
        dbapi_connection.create_function("power", 2, _power, deterministic=True)
        return True


def install_sqlite_functions(engine: Engine) -> None:
    """Make every new connection of a SQLite engine able to run compiled segments."""
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        add_sqlite_functions(dbapi_connection)

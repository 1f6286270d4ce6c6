from __future__ import annotations

from collections import namedtuple
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    true,
    update,
)

from whenthen.kernel.ids import ProfileId, WorkspaceId
from whenthen.profiles.model import Identity, IdentityKind, Merge, Profile
from whenthen.profiles.tables import (
    erasures,
    group_members,
    groups,
    identities,
    profile_merges,
    profiles,
)
from whenthen.storage.driver import DriverQuery, StoredValues, execute, execute_each, statements, write_by_key
from whenthen.storage.id_lists import array_param, by_ids, ids_in, per_dialect
from whenthen.storage.plans import tested_only


def _profile(row: Any, ids: Sequence[Identity] = ()) -> Profile:
    return Profile(
        id=ProfileId(row.id),
        workspace_id=WorkspaceId(row.workspace_id),
        traits=dict(row.traits or {}),
        trait_times=dict(row.trait_times or {}),
        email=row.email,
        phone=row.phone,
        timezone=row.timezone,
        first_seen=row.first_seen,
        last_seen=row.last_seen,
        event_count=int(row.event_count),
        merged_into=ProfileId(row.merged_into) if row.merged_into else None,
        created_at=row.created_at,
        updated_at=row.updated_at,
        identities=tuple(ids),
    )


#: The reads below run for every event the pipeline applies: built once, with bind
#: parameters (SQLAlchemy then reuses their compiled form without rebuilding them).
_GET = select(profiles).where(profiles.c.id == bindparam("pid"), profiles.c.workspace_id == bindparam("ws"))
_GET_FOR_UPDATE = _GET.with_for_update()
_IDENTITIES_OF = (
    select(identities.c.kind, identities.c.value)
    .where(identities.c.workspace_id == bindparam("ws"), identities.c.profile_id == bindparam("pid"))
    .order_by(identities.c.created_at, identities.c.kind, identities.c.value)
)
_OWNER_OF = select(identities.c.profile_id).where(
    identities.c.workspace_id == bindparam("ws"),
    identities.c.kind == bindparam("kind"),
    identities.c.value == bindparam("value"),
)


_BY_IDENTITY = (
    select(profiles)
    .join(identities, identities.c.profile_id == profiles.c.id)
    .where(
        identities.c.workspace_id == bindparam("ws"),
        identities.c.kind == bindparam("kind"),
        identities.c.value == bindparam("value"),
    )
)
_BY_IDENTITY_FOR_UPDATE = _BY_IDENTITY.with_for_update(of=profiles)


#: Run on the driver's cursor: the read of nearly every event the pipeline applies.
_BY_IDENTITY_QUERY = per_dialect(
    lambda d: DriverQuery(_BY_IDENTITY_FOR_UPDATE if d == "postgresql" else _BY_IDENTITY)
)
_ProfileRow = namedtuple("_ProfileRow", [c.name for c in _BY_IDENTITY.selected_columns])  # type: ignore[misc]


def by_identity(conn: Connection, workspace_id: str, kind: IdentityKind, value: str) -> Profile | None:
    """The profile owning an identity, locked on PostgreSQL (``owner_of`` and ``get``
    with ``lock`` in one statement), without its identities."""
    query = _BY_IDENTITY_QUERY[conn.dialect.name]
    row = query.first(conn, {"ws": workspace_id, "kind": kind.value, "value": value})
    return None if row is None else _profile(_ProfileRow._make(row))


def _owners_read(dialect: str) -> DriverQuery:
    if dialect == "postgresql":
        return DriverQuery(_owners_read_postgresql())
    stmt = (
        select(identities.c.kind, identities.c.value, *_BY_IDENTITY.selected_columns)
        .join(profiles, identities.c.profile_id == profiles.c.id)
        .where(
            # The workspace in each branch: SQLite then answers each branch from the
            # identities' key (a multi-index OR); with it outside, it searched the key by
            # the workspace alone, every identity of the workspace.
            or_(
                and_(
                    identities.c.workspace_id == bindparam("ws"),
                    identities.c.kind == IdentityKind.USER_ID.value,
                    ids_in(dialect, identities.c.value, "uids"),
                ),
                and_(
                    identities.c.workspace_id == bindparam("ws"),
                    identities.c.kind == IdentityKind.ANONYMOUS_ID.value,
                    ids_in(dialect, identities.c.value, "aids"),
                ),
            ),
        )
        .order_by(profiles.c.id)
    )
    return DriverQuery(stmt)


def _owners_read_postgresql() -> Select[Any]:
    """Each (kind, value) looked up on its own through the identities' primary key (a
    ``LATERAL`` subquery with ``LIMIT 1``, which the planner runs once per key), then
    the profiles locked in the order of their ids: two batches locking some of the same
    people take them in the same order.

    Not ``kind = 'user_id' AND value = ANY(:uids) OR ...``: the planner's choice for that
    depends on statistics, and with none (a fresh table, autovacuum not yet run) or with
    a small table it scanned the workspace's every identity, comparing each with every id
    of the batch (9-15 ms a batch of 100 events at 1,000 people, against ~0.3 ms)."""
    keys = (
        func.unnest(array_param("kinds"), array_param("values"))
        .table_valued("kind", "value")
        .render_derived("k")
    )
    owner = (
        select(identities.c.profile_id)
        .where(
            identities.c.workspace_id == bindparam("ws"),
            identities.c.kind == keys.c.kind,
            identities.c.value == keys.c.value,
        )
        .limit(literal_column("1"))  # written out: the plan is made knowing it
        .lateral("o")
    )
    return (
        select(keys.c.kind, keys.c.value, *_BY_IDENTITY.selected_columns)
        .select_from(keys.join(owner, true()).join(profiles, profiles.c.id == owner.c.profile_id))
        .order_by(profiles.c.id)
        .with_for_update(of=profiles)
    )


_OWNERS = per_dialect(_owners_read)


def by_identities(
    conn: Connection, workspace_id: str, user_ids: Sequence[str], anonymous_ids: Sequence[str]
) -> dict[tuple[str, str], Profile]:
    """``by_identity`` for many ids at once (one statement, the profiles locked on
    PostgreSQL in id order): the profile owning each id that has one, by (kind, value)."""
    if not user_ids and not anonymous_ids:
        return {}
    if conn.dialect.name == "postgresql":
        kinds = [IdentityKind.USER_ID.value] * len(user_ids) + [IdentityKind.ANONYMOUS_ID.value] * len(
            anonymous_ids
        )
        params: dict[str, Any] = {"ws": workspace_id, "kinds": kinds, "values": [*user_ids, *anonymous_ids]}
    else:
        params = {"ws": workspace_id, "uids": list(user_ids), "aids": list(anonymous_ids)}
    rows = _OWNERS[conn.dialect.name].all(conn, params)
    return {(r[0], r[1]): _profile(_ProfileRow._make(r[2:])) for r in rows}


#: PostgreSQL: the profiles among the ids that no other transaction holds, locked.
_LOCK_FREE = by_ids("postgresql", profiles, "id", "ids", [profiles.c.id], lock=True)


def lock_free(conn: Connection, profile_ids: Sequence[str]) -> set[str]:
    """PostgreSQL only: lock those of the profiles no other transaction holds (a pipeline
    batch applying their events), skipping the others without waiting; returns the ones
    locked."""
    return set(conn.execute(_LOCK_FREE, {"ids": list(profile_ids)}).scalars())


def get(
    conn: Connection, workspace_id: str, profile_id: str, *, lock: bool = False, with_identities: bool = True
) -> Profile | None:
    stmt = _GET_FOR_UPDATE if lock and conn.dialect.name == "postgresql" else _GET
    row = conn.execute(stmt, {"pid": profile_id, "ws": workspace_id}).first()
    if row is None:
        return None
    return _profile(row, identities_of(conn, workspace_id, profile_id) if with_identities else ())


def get_many(conn: Connection, workspace_id: str, profile_ids: Sequence[str]) -> dict[str, Profile]:
    """Profiles by id (those that exist), without their identities: one prebuilt statement
    at the driver's level with the ids as one list parameter (``storage.id_lists.by_ids``;
    the dispatcher reads a batch's people with it, and an expanding ``IN`` gave a new
    statement text to compile, and for PostgreSQL to parse, on every batch)."""
    if not profile_ids:
        return {}
    rows = _PROFILES_OF_MANY[conn.dialect.name].all(conn, {"ids": list(profile_ids), "ws": workspace_id})
    return {r[0]: _profile(_ProfileRow._make(r)) for r in rows}


def identities_of_many(
    conn: Connection, workspace_id: str, profile_ids: Sequence[str]
) -> dict[str, list[Identity]]:
    """``identities_of`` for many profiles in one statement, each list in the same order."""
    found: dict[str, list[Identity]] = {pid: [] for pid in profile_ids}
    if not profile_ids:
        return found
    rows = _IDENTITIES_OF_MANY[conn.dialect.name].all(conn, {"ids": list(profile_ids), "ws": workspace_id})
    for profile_id, kind, value, _ in rows:
        found[profile_id].append(Identity(IdentityKind(kind), value))
    return found


_PROFILES_OF_MANY = per_dialect(
    lambda d: DriverQuery(
        # The table's columns in order: the columns of ``_ProfileRow``.
        by_ids(d, profiles, "id", "ids", list(profiles.c), profiles.c.workspace_id == bindparam("ws"))
    )
)
_IDENTITIES_OF_MANY = per_dialect(
    lambda d: DriverQuery(
        by_ids(
            d,
            identities,
            "profile_id",
            "ids",
            [identities.c.profile_id, identities.c.kind, identities.c.value, identities.c.created_at],
            identities.c.workspace_id == bindparam("ws"),
            order_by=("profile_id", "created_at", "kind", "value"),
        )
    )
)


def identities_of(conn: Connection, workspace_id: str, profile_id: str) -> list[Identity]:
    rows = conn.execute(_IDENTITIES_OF, {"ws": workspace_id, "pid": profile_id})
    return [Identity(IdentityKind(r.kind), r.value) for r in rows]


def owner_of(conn: Connection, workspace_id: str, kind: IdentityKind, value: str) -> ProfileId | None:
    row = conn.execute(_OWNER_OF, {"ws": workspace_id, "kind": kind.value, "value": value}).first()
    return ProfileId(row[0]) if row else None


def has_kind(conn: Connection, workspace_id: str, profile_id: str, kind: IdentityKind) -> bool:
    row = conn.execute(
        select(identities.c.value)
        .where(
            identities.c.workspace_id == workspace_id,
            identities.c.profile_id == profile_id,
            identities.c.kind == kind.value,
        )
        .limit(1)
    ).first()
    return row is not None


#: Built once, executed with values: a new person (every first-time visitor) makes a
#: profile and an identity, and building an ``insert().values(...)`` per call (its cache
#: key included) cost more than running it.
_INSERT_PROFILE = insert(profiles)
_INSERT_IDENTITY = insert(identities)


def insert_profile(conn: Connection, workspace_id: str, profile_id: str, now: datetime) -> None:
    conn.execute(
        _INSERT_PROFILE,
        {
            "id": profile_id,
            "workspace_id": workspace_id,
            "traits": {},
            "trait_times": {},
            "email": None,
            "phone": None,
            "timezone": None,
            "first_seen": None,
            "last_seen": None,
            "event_count": 0,
            "merged_into": None,
            "created_at": now,
            "updated_at": now,
            "version": 1,
        },
    )


def attach_identity(
    conn: Connection, workspace_id: str, profile_id: str, identity: Identity, now: datetime
) -> None:
    conn.execute(
        _INSERT_IDENTITY,
        {
            "workspace_id": workspace_id,
            "kind": identity.kind.value,
            "value": identity.value,
            "profile_id": profile_id,
            "created_at": now,
        },
    )


#: Built once (see journeys/repository.py ``_SAVE_STATE``): this runs for every event.
_SAVE_STATE = (
    update(profiles)
    .where(profiles.c.id == bindparam("b_id"))
    .values(
        traits=bindparam("b_traits"),
        trait_times=bindparam("b_trait_times"),
        email=bindparam("b_email"),
        phone=bindparam("b_phone"),
        timezone=bindparam("b_timezone"),
        first_seen=bindparam("b_first_seen"),
        last_seen=bindparam("b_last_seen"),
        event_count=bindparam("b_event_count"),
        updated_at=bindparam("b_updated_at"),
        version=profiles.c.version + 1,
    )
)


#: An event that changed no trait: only the person's activity (and time zone) moves.
#: A person's activity, written at the driver's level: it runs for nearly every event the
#: pipeline applies, and SQLAlchemy's execution cost more than the statement
#: (``tests/integration/test_driver_writes.py`` checks it stores what SQLAlchemy's
#: ``update(profiles)`` of the same values stores).
_SAVE_ACTIVITY_SQL = statements(
    "UPDATE profiles SET timezone = %s, first_seen = %s, last_seen = %s, event_count = %s,"
    " updated_at = %s, version = version + 1 WHERE id = %s"
)


def save_activity(conn: Connection, profile: Profile, now: datetime) -> None:
    """``save_state`` for a profile whose traits, email and phone did not change: the
    traits are not written again (their JSON is most of the statement's cost)."""
    at = StoredValues(conn).at
    execute(
        conn,
        _SAVE_ACTIVITY_SQL,
        (
            profile.timezone,
            at(profile.first_seen),
            at(profile.last_seen),
            profile.event_count,
            at(now),
            profile.id,
        ),
    )


def save_activities(conn: Connection, people: Sequence[Profile], now: datetime) -> None:
    """``save_activity`` for many profiles at once (one executemany: psycopg sends the
    rows in one round trip)."""
    if not people:
        return
    at = StoredValues(conn).at
    rows = [(p.timezone, at(p.first_seen), at(p.last_seen), p.event_count, at(now), p.id) for p in people]
    if conn.dialect.name == "postgresql" and len(rows) > 1:
        write_by_key(conn, _SAVE_ACTIVITIES_POSTGRESQL, _ACTIVITY_KEYS, rows)  # ADR 0021
        return
    execute_each(conn, _SAVE_ACTIVITY_SQL, rows)


_ACTIVITY_KEYS = ("timezone", "first_seen", "last_seen", "event_count", "updated_at", "id")
_SAVE_ACTIVITIES_POSTGRESQL = (
    "UPDATE profiles AS p SET timezone = v.timezone, first_seen = v.first_seen, last_seen = v.last_seen,"
    " event_count = v.event_count, updated_at = v.updated_at, version = p.version + 1"
    " FROM jsonb_to_recordset(%s::jsonb) AS v(timezone text, first_seen timestamptz,"
    " last_seen timestamptz, event_count bigint, updated_at timestamptz, id text) WHERE p.id = v.id"
)


def save_state(conn: Connection, profile: Profile, now: datetime) -> None:
    conn.execute(
        _SAVE_STATE,
        {
            "b_id": profile.id,
            "b_traits": profile.traits,
            "b_trait_times": profile.trait_times,
            "b_email": profile.email,
            "b_phone": profile.phone,
            "b_timezone": profile.timezone,
            "b_first_seen": profile.first_seen,
            "b_last_seen": profile.last_seen,
            "b_event_count": profile.event_count,
            "b_updated_at": now,
        },
    )


# A person's identities and group memberships are found by their ``profile_id`` index:
# the tables' primary keys start with the workspace, and SQLite (no statistics) would
# otherwise walk the workspace's whole key for ``workspace_id = ?`` (storage.plans).
def _of_workspace(conn: Connection, table: Table, workspace_id: str) -> ColumnElement[bool]:
    return tested_only(conn.dialect.name, table.c.workspace_id) == workspace_id


def move_identities(conn: Connection, workspace_id: str, from_id: str, into_id: str) -> None:
    conn.execute(
        update(identities)
        .where(_of_workspace(conn, identities, workspace_id), identities.c.profile_id == from_id)
        .values(profile_id=into_id)
    )


def move_group_memberships(conn: Connection, workspace_id: str, from_id: str, into_id: str) -> None:
    rows = conn.execute(
        select(group_members.c.group_id, group_members.c.joined_at).where(
            _of_workspace(conn, group_members, workspace_id), group_members.c.profile_id == from_id
        )
    ).all()
    for r in rows:
        join_group(conn, workspace_id, r.group_id, into_id, r.joined_at)
    conn.execute(
        delete(group_members).where(
            _of_workspace(conn, group_members, workspace_id), group_members.c.profile_id == from_id
        )
    )


#: Built once (a merge happens whenever a known visitor identifies): see ``_INSERT_PROFILE``.
_MARK_MERGED = (
    update(profiles)
    .where(profiles.c.id == bindparam("b_from"))
    .values(
        merged_into=bindparam("b_into"),
        traits=bindparam("b_empty_traits"),
        trait_times=bindparam("b_empty_times"),
        email=None,
        phone=None,
        event_count=0,
        updated_at=bindparam("b_now"),
    )
)
_FLATTEN = (
    update(profiles)
    .where(profiles.c.merged_into == bindparam("b_from"))
    .values(merged_into=bindparam("b_into"))
)
_INSERT_MERGE = insert(profile_merges)


def mark_merged(conn: Connection, from_id: str, into_id: str, now: datetime) -> None:
    # The source keeps no data of its own: it only redirects to the survivor.
    conn.execute(
        _MARK_MERGED,
        {"b_from": from_id, "b_into": into_id, "b_empty_traits": {}, "b_empty_times": {}, "b_now": now},
    )
    # Flatten chains: whatever pointed at the source now points at the survivor.
    conn.execute(_FLATTEN, {"b_from": from_id, "b_into": into_id})


def record_merge(conn: Connection, workspace_id: str, merge: Merge) -> None:
    conn.execute(
        _INSERT_MERGE,
        {
            "workspace_id": workspace_id,
            "from_profile_id": merge.from_profile_id,
            "into_profile_id": merge.into_profile_id,
            "reason": merge.reason,
            "message_id": merge.message_id,
            "merged_at": merge.merged_at,
        },
    )


def merges_into(conn: Connection, workspace_id: str, profile_id: str) -> list[Merge]:
    rows = conn.execute(
        select(profile_merges)
        .where(
            profile_merges.c.workspace_id == workspace_id,
            or_(
                profile_merges.c.into_profile_id == profile_id,
                profile_merges.c.from_profile_id.in_(merged_ids(conn, workspace_id, profile_id)),
            ),
        )
        .order_by(profile_merges.c.merged_at, profile_merges.c.id)
    )
    return [
        Merge(
            from_profile_id=ProfileId(r.from_profile_id),
            into_profile_id=ProfileId(r.into_profile_id),
            reason=r.reason,
            message_id=r.message_id,
            merged_at=r.merged_at,
        )
        for r in rows
    ]


def merged_ids(conn: Connection, workspace_id: str, profile_id: str) -> list[str]:
    """Ids of the tombstones that redirect to ``profile_id`` (chains are kept flat)."""
    rows = conn.execute(
        select(profiles.c.id).where(
            profiles.c.workspace_id == workspace_id, profiles.c.merged_into == profile_id
        )
    )
    return [r[0] for r in rows]


_GROUP_MEMBER = select(group_members.c.group_id).where(
    group_members.c.workspace_id == bindparam("ws"),
    group_members.c.group_id == bindparam("gid"),
    group_members.c.profile_id == bindparam("pid"),
)
_INSERT_GROUP_MEMBER = insert(group_members)
_GROUP_TRAITS = select(groups.c.traits).where(
    groups.c.workspace_id == bindparam("ws"), groups.c.group_id == bindparam("gid")
)
_INSERT_GROUP = insert(groups)
_UPDATE_GROUP = (
    update(groups)
    .where(groups.c.workspace_id == bindparam("ws"), groups.c.group_id == bindparam("gid"))
    .values(traits=bindparam("b_traits"), updated_at=bindparam("b_now"))
)


def join_group(conn: Connection, workspace_id: str, group_id: str, profile_id: str, now: datetime) -> None:
    key = {"ws": workspace_id, "gid": group_id, "pid": profile_id}
    if conn.execute(_GROUP_MEMBER, key).first() is None:
        conn.execute(
            _INSERT_GROUP_MEMBER,
            {"workspace_id": workspace_id, "group_id": group_id, "profile_id": profile_id, "joined_at": now},
        )


def upsert_group(
    conn: Connection, workspace_id: str, group_id: str, traits: dict[str, Any], now: datetime
) -> None:
    key = {"ws": workspace_id, "gid": group_id}
    row = conn.execute(_GROUP_TRAITS, key).first()
    if row is None:
        conn.execute(
            _INSERT_GROUP,
            {"workspace_id": workspace_id, "group_id": group_id, "traits": traits, "updated_at": now},
        )
    else:
        conn.execute(_UPDATE_GROUP, {**key, "b_traits": {**(row.traits or {}), **traits}, "b_now": now})


def groups_of(conn: Connection, workspace_id: str, profile_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(groups.c.group_id, groups.c.traits, group_members.c.joined_at)
        .join(
            groups,
            (groups.c.workspace_id == group_members.c.workspace_id)
            & (groups.c.group_id == group_members.c.group_id),
        )
        .where(_of_workspace(conn, group_members, workspace_id), group_members.c.profile_id == profile_id)
        .order_by(group_members.c.joined_at)
    )
    return [{"group_id": r.group_id, "traits": r.traits, "joined_at": r.joined_at} for r in rows]


def find_by_email(conn: Connection, workspace_id: str, email: str) -> Profile | None:
    row = conn.execute(
        select(profiles)
        .where(
            profiles.c.workspace_id == workspace_id,
            profiles.c.email == email,
            profiles.c.merged_into.is_(None),
        )
        .order_by(profiles.c.last_seen.desc().nulls_last(), profiles.c.id)
        .limit(1)
    ).first()
    return get(conn, workspace_id, row.id) if row else None


def search(
    conn: Connection,
    workspace_id: str,
    *,
    email: str | None,
    trait_equals: dict[str, str],
    after_id: str | None,
    limit: int,
) -> list[Profile]:
    stmt = select(profiles).where(profiles.c.workspace_id == workspace_id, profiles.c.merged_into.is_(None))
    if email is not None:
        stmt = stmt.where(profiles.c.email == email)
    for key, value in trait_equals.items():
        stmt = stmt.where(profiles.c.traits[key].as_string() == value)
    if after_id is not None:
        stmt = stmt.where(profiles.c.id > after_id)
    stmt = stmt.order_by(profiles.c.id).limit(limit)
    return [_profile(r, identities_of(conn, workspace_id, r.id)) for r in conn.execute(stmt)]


_HAS_ERASURES = select(erasures.c.identity_hash).where(erasures.c.workspace_id == bindparam("ws")).limit(1)


def has_erasures(conn: Connection, workspace_id: str) -> bool:
    return conn.execute(_HAS_ERASURES, {"ws": workspace_id}).first() is not None


def is_erased(conn: Connection, workspace_id: str, hashes: Sequence[str]) -> bool:
    if not hashes:
        return False
    row = conn.execute(
        select(erasures.c.identity_hash)
        .where(erasures.c.workspace_id == workspace_id, erasures.c.identity_hash.in_(list(hashes)))
        .limit(1)
    ).first()
    return row is not None


def record_erasure(conn: Connection, workspace_id: str, hashes: Sequence[str], now: datetime) -> None:
    existing = {
        r[0]
        for r in conn.execute(
            select(erasures.c.identity_hash).where(
                erasures.c.workspace_id == workspace_id, erasures.c.identity_hash.in_(list(hashes))
            )
        )
    }
    fresh = [h for h in dict.fromkeys(hashes) if h not in existing]
    if fresh:
        conn.execute(
            insert(erasures),
            [{"workspace_id": workspace_id, "identity_hash": h, "erased_at": now} for h in fresh],
        )


def delete_person(conn: Connection, workspace_id: str, profile_ids: Sequence[str]) -> None:
    ids = list(profile_ids)
    conn.execute(
        delete(identities).where(
            _of_workspace(conn, identities, workspace_id), identities.c.profile_id.in_(ids)
        )
    )
    conn.execute(
        delete(group_members).where(
            _of_workspace(conn, group_members, workspace_id), group_members.c.profile_id.in_(ids)
        )
    )
    # Two statements, one index each (``ix_profile_merges_from``, ``ix_profile_merges_into``):
    # with the two ids tested under one OR, SQLite walked the workspace's merges.
    for column in (profile_merges.c.from_profile_id, profile_merges.c.into_profile_id):
        conn.execute(
            delete(profile_merges).where(profile_merges.c.workspace_id == workspace_id, column.in_(ids))
        )
    conn.execute(delete(profiles).where(profiles.c.workspace_id == workspace_id, profiles.c.id.in_(ids)))


def senders(
    conn: Connection, ws: str, profile_ids: Sequence[str]
) -> dict[str, tuple[str | None, str | None]]:
    """Profile id -> (user id, anonymous id) the person's system events are sent under:
    the survivor's when merged away, its first userId,
    else its first anonymousId (identities in creation order); absent when the profile does
    not exist or has neither."""
    d = conn.dialect.name
    ids = sorted(set(profile_ids))
    target: dict[str, str] = {}
    for i in range(0, len(ids), _ID_CHUNK):
        chunk = ids[i : i + _ID_CHUNK]
        # By id, the workspace checked per row: with ``workspace_id = ?`` in the WHERE,
        # SQLite walked the workspace's whole index for every chunk (20 s of a 200,000-exit
        # expiry).
        for pid, owner_ws, merged_into in _SENDER_TARGETS[d].all(conn, {"ids": chunk}):
            if owner_ws == ws:
                target[pid] = merged_into or pid
    survivors = sorted({t for p, t in target.items() if t != p})
    existing = set(target)
    for i in range(0, len(survivors), _ID_CHUNK):
        existing.update(
            pid
            for pid, owner_ws in _SENDER_SURVIVORS[d].all(conn, {"ids": survivors[i : i + _ID_CHUNK]})
            if owner_ws == ws
        )
    owners = sorted({t for t in target.values() if t in existing})
    firsts: dict[str, dict[str, str]] = {}
    for i in range(0, len(owners), _ID_CHUNK):
        # The workspace is checked per row: with ``workspace_id = ?`` in the WHERE, SQLite
        # (no statistics) walks the workspace's whole primary key instead of the profiles'.
        rows = _SENDER_IDS[d].all(conn, {"ids": owners[i : i + _ID_CHUNK]})
        for row_ws, pid, kind, value, _ in rows:
            if row_ws == ws:
                firsts.setdefault(pid, {}).setdefault(kind, value)
    out: dict[str, tuple[str | None, str | None]] = {}
    for pid, owner in target.items():
        found = firsts.get(owner, {}) if owner in existing else {}
        user_id = found.get("user_id")
        anonymous_id = None if user_id else found.get("anonymous_id")
        if user_id or anonymous_id:
            out[pid] = (user_id, anonymous_id)
    return out


_ID_CHUNK = 2000

# ``senders``' statements, built once per dialect with the ids as one list parameter
# (``storage.id_lists``): it runs for every entry or exit the pipeline announces, and
# building them (``in_``, the cache key) cost more than running them.
_SENDER_TARGETS = per_dialect(
    lambda d: DriverQuery(
        by_ids(d, profiles, "id", "ids", [profiles.c.id, profiles.c.workspace_id, profiles.c.merged_into])
    )
)
_SENDER_SURVIVORS = per_dialect(
    lambda d: DriverQuery(by_ids(d, profiles, "id", "ids", [profiles.c.id, profiles.c.workspace_id]))
)
_SENDER_IDS = per_dialect(
    lambda d: DriverQuery(
        by_ids(
            d,
            identities,
            "profile_id",
            "ids",
            [
                identities.c.workspace_id,
                identities.c.profile_id,
                identities.c.kind,
                identities.c.value,
                identities.c.created_at,
            ],
            order_by=("created_at", "kind", "value"),
        )
    )
)

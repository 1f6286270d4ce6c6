"""Identity resolution, traits, merges and erasure. Never commits.

Resolution rules (docs/design/profiles.md):

* A call's ``userId`` and ``anonymousId`` are looked up. Unknown ids create a profile.
* A call that carries both merges the anonymous profile into the known one, unless the
  anonymous profile already belongs to another ``userId`` (a shared device): then the
  call goes to the known profile and nothing is merged.
* ``alias`` merges the profile of ``previousId`` (as a userId or an anonymousId) into the
  profile of ``userId``, even when both are known: that is what alias is for.
* A merge moves identities, events and group memberships to the survivor, merges traits
  (latest timestamp wins, per top-level trait), and leaves the source as a tombstone
  that redirects; it is recorded with its reason, message id and time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Connection

from whenthen import lists, tracking
from whenthen.kernel.errors import NotFound
from whenthen.kernel.ids import ProfileId, new_profile_id
from whenthen.kernel.keyed_hash import keyed_hash
from whenthen.profiles import consent, rechecks
from whenthen.profiles import repository as repo
from whenthen.profiles.model import (
    Identity,
    IdentityKind,
    Merge,
    Profile,
    apply_traits,
    earliest,
    latest,
    merge_traits,
)
from whenthen.profiles.normalization import (
    normalise_email,
    normalise_timezone,
    normalise_traits,
    reachability,
)
from whenthen.storage import locks
from whenthen.tracking import CallType, StoredEvent


@dataclass(frozen=True, slots=True)
class Applied:
    """What applying one event did: the profile it now belongs to, or suppression."""

    profile_id: ProfileId | None
    suppressed: bool
    merged_from: ProfileId | None = None
    traits_before: Mapping[str, Any] = field(default_factory=dict)
    traits_after: Mapping[str, Any] = field(default_factory=dict)
    #: The person's first event (a profile made by this event, most often): nothing was
    #: ever evaluated for them, so every segment is (one with a negation holds for a
    #: person with no traits and no events).
    first: bool = False


def has_erasures(conn: Connection, workspace_id: str) -> bool:
    """Whether anyone was ever erased in the workspace (most batches can skip the check)."""
    return repo.has_erasures(conn, workspace_id)


def erasure_hashes(secret: bytes, workspace_id: str, values: list[tuple[str, str]]) -> list[str]:
    return [keyed_hash(secret, f"{workspace_id}\x1f{kind}\x1f{value}") for kind, value in values]


def _event_identity_values(event: StoredEvent) -> list[tuple[str, str]]:
    values: list[tuple[str, str]] = []
    if event.user_id:
        values.append(("user_id", event.user_id))
    if event.anonymous_id:
        values.append(("anonymous_id", event.anonymous_id))
    previous = event.payload.get("previousId")
    if event.type is CallType.ALIAS and previous is not None:
        values.append(("user_id", str(previous)))
        values.append(("anonymous_id", str(previous)))
    traits = event.payload.get("traits")
    if isinstance(traits, dict):
        email = normalise_email(traits.get("email"))
        if email:
            values.append(("email", email))
    return values


class HeldProfiles:
    """A pipeline batch's people (ADR 0014): the profiles its events name by one id read
    and locked together at the batch's start (``prefetch``), and the activity its events
    leave (first and last seen, event count) held and written together (``flush``: at the
    batch's end, and before anything that reads profiles from the database for another
    reason, i.e. a resolution that may merge).

    A person's profile, once an event of theirs is applied, is kept as that event left it
    (``remember``), and their later events in the batch start from it without a read.

    Exactness rests on two facts. Within a batch, a person's profile row is written only
    by their own events (``apply_event``), by a merge (after which everything read ahead
    or kept is dropped: ``merged``) and by a journey's profile update, which the pipeline
    reports (``changed``: the person is then read again, the held activity laid over).
    The batch holds the person's lock, so nothing outside it writes them meanwhile. And
    nothing in a batch reads the activity columns but ``apply_event`` itself."""

    def __init__(self) -> None:
        #: Who owns each one-id key the batch knows (read ahead, or learned by applying).
        self._keys: dict[tuple[str, str, str], str] = {}
        #: The people read ahead that no event of theirs was applied to yet.
        self._ahead: dict[str, Profile] = {}
        #: The people as the batch's last event of theirs left them.
        self._kept: dict[str, Profile] = {}
        self._activity: dict[str, Profile] = {}

    def prefetch(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        """Read and lock the owners of the ids of the events that name a person by one id
        (``_known_by_its_only_id``'s case), one statement per workspace."""
        wanted: dict[str, dict[str, set[str]]] = {}
        for event in events:
            key = _key_of(event)
            if key is not None:
                ws, kind, value = key
                wanted.setdefault(ws, {}).setdefault(kind, set()).add(value)
        for ws, ids in wanted.items():
            found = repo.by_identities(
                conn,
                ws,
                sorted(ids.get(IdentityKind.USER_ID.value, ())),
                sorted(ids.get(IdentityKind.ANONYMOUS_ID.value, ())),
            )
            for (kind, value), profile in found.items():
                self._keys[(ws, kind, value)] = profile.id
                self._ahead[profile.id] = profile

    def prefetched(self) -> dict[str, list[str]]:
        """The people read ahead, by workspace (for other steps' own read-ahead)."""
        out: dict[str, list[str]] = {}
        for pid, profile in sorted(self._ahead.items()):
            out.setdefault(profile.workspace_id, []).append(pid)
        return out

    def take(self, event: StoredEvent) -> Profile | None:
        """The owner of the event's one id as this batch last left them, or as read ahead
        if no event of theirs was applied yet; ``None`` when they must be read."""
        key = _key_of(event)
        pid = None if key is None else self._keys.get(key)
        if pid is None:
            return None
        kept = self._kept.get(pid)
        return kept if kept is not None else self._ahead.get(pid)

    def remember(self, event: StoredEvent, profile: Profile) -> None:
        """The person as ``event`` left them (written or held)."""
        self._ahead.pop(profile.id, None)
        self._kept[profile.id] = profile
        key = _key_of(event)
        if key is not None:
            self._keys[key] = profile.id

    def changed(self, profile_id: str) -> None:
        """Something else in the batch wrote the person (a journey's profile update):
        their next event reads them again."""
        self._kept.pop(profile_id, None)

    def current(self, profile: Profile) -> Profile:
        """``profile`` as read from the database, with the activity held for it laid over."""
        held = self._activity.get(profile.id)
        if held is None:
            return profile
        return replace(
            profile, first_seen=held.first_seen, last_seen=held.last_seen, event_count=held.event_count
        )

    def hold(self, profile: Profile) -> None:
        """Hold the profile's activity, to be written at ``flush``."""
        self._activity[profile.id] = profile

    def written(self, profile_id: str) -> None:
        """The profile was written whole: nothing of it is held any longer."""
        self._activity.pop(profile_id, None)

    def merged(self) -> None:
        """A merge moved identities and wrote the survivor: nothing read ahead or kept
        holds any longer."""
        self._keys.clear()
        self._ahead.clear()
        self._kept.clear()

    def flush(self, conn: Connection, now: datetime) -> None:
        if self._activity:
            repo.save_activities(conn, list(self._activity.values()), now)
            self._activity.clear()


def apply_event(
    conn: Connection,
    event: StoredEvent,
    *,
    secret: bytes,
    now: datetime,
    check_erasures: bool = True,
    held: HeldProfiles | None = None,
) -> Applied:
    """Attribute one logged event to a profile and apply what it says about the person.

    ``check_erasures=False`` skips the erasure look-up, for a batch that found the
    workspace has no erasures at all (see ``has_erasures``). With ``held`` (a pipeline
    batch's :class:`HeldProfiles`), the profile is taken from what the batch read at its
    start when it can be, and an activity-only change is held for the batch's end."""
    ws = event.workspace_id
    if check_erasures and repo.is_erased(conn, ws, erasure_hashes(secret, ws, _event_identity_values(event))):
        return Applied(profile_id=None, suppressed=True)

    merged_from: ProfileId | None = None
    profile = held.take(event) if held is not None else None
    if profile is None:
        profile = _known_by_its_only_id(conn, event)
        if profile is not None and held is not None:
            profile = held.current(profile)
    if profile is not None:
        profile_id = profile.id
    else:
        if held is not None:
            # A resolution may merge, and a merge reads both profiles' activity.
            held.flush(conn, now)
        if event.type is CallType.ALIAS:
            profile_id, merged_from = _resolve_alias(conn, event, now)
        else:
            profile_id, merged_from = _resolve(conn, event, now)
        if merged_from is not None and held is not None:
            held.merged()
        profile = repo.get(conn, ws, profile_id, lock=True, with_identities=False)
    assert profile is not None
    if profile.merged_into is not None:
        # Another worker merged it away between our look-up and our lock: follow it.
        profile_id = profile.merged_into
        profile = repo.get(conn, ws, profile_id, lock=True, with_identities=False)
        assert profile is not None
        if held is not None:
            profile = held.current(profile)
    traits, times = profile.traits, profile.trait_times
    if event.type is CallType.IDENTIFY:
        incoming = event.payload.get("traits") or {}
        if incoming:
            traits, times = apply_traits(traits, times, normalise_traits(incoming), event.timestamp)
    elif event.type is CallType.GROUP:
        group_id = str(event.payload["groupId"])
        repo.upsert_group(conn, ws, group_id, event.payload.get("traits") or {}, now)
        repo.join_group(conn, ws, group_id, profile_id, event.timestamp)
    context = event.payload.get("context") or {}
    first_seen = earliest(profile.first_seen, event.timestamp)
    last_seen = latest(profile.last_seen, event.timestamp)
    if traits is profile.traits:
        # No trait changed, so neither did the email and phone taken from them (every
        # writer of traits sets those): only the activity and the time zone move.
        timezone = normalise_timezone(traits.get("timezone")) or normalise_timezone(context.get("timezone"))
        active = replace(
            profile,
            timezone=timezone or profile.timezone,
            first_seen=first_seen,
            last_seen=last_seen,
            event_count=profile.event_count + 1,
        )
        if held is not None and active.timezone == profile.timezone:
            # The time zone is read in the batch (journeys' local times): held only
            # while it stays; the activity columns are read by nothing in it.
            held.hold(active)
        else:
            repo.save_activity(conn, active, now)
            if held is not None:
                held.written(profile_id)
        if held is not None:
            held.remember(event, active)
    else:
        reach = reachability(traits, context.get("timezone"))
        updated = replace(
            profile,
            traits=traits,
            trait_times=times,
            email=reach.email,
            phone=reach.phone,
            timezone=reach.timezone or profile.timezone,
            first_seen=first_seen,
            last_seen=last_seen,
            event_count=profile.event_count + 1,
        )
        repo.save_state(conn, updated, now)
        if held is not None:
            held.written(profile_id)
            held.remember(event, updated)
    return Applied(
        profile_id=profile_id,
        suppressed=False,
        merged_from=merged_from,
        traits_before=profile.traits,
        traits_after=traits,
        first=profile.event_count == 0,
    )


def _known_by_its_only_id(conn: Connection, event: StoredEvent) -> Profile | None:
    """The most common case in one statement: a call other than alias with one id
    (userId or anonymousId, not both) that a profile already owns. ``None`` otherwise,
    and the general resolution (``_resolve``) decides."""
    key = _key_of(event)
    if key is None:
        return None
    ws, kind, value = key
    return repo.by_identity(conn, ws, IdentityKind(kind), value)


def _key_of(event: StoredEvent) -> tuple[str, str, str] | None:
    """(workspace, kind, value) of a one-id event's id; ``None`` for other events."""
    if not _one_id(event):
        return None
    if event.user_id is not None:
        return (event.workspace_id, IdentityKind.USER_ID.value, event.user_id)
    assert event.anonymous_id is not None
    return (event.workspace_id, IdentityKind.ANONYMOUS_ID.value, event.anonymous_id)


def _one_id(event: StoredEvent) -> bool:
    """A call other than alias with one id (userId or anonymousId, not both)."""
    return event.type is not CallType.ALIAS and (event.user_id is None) != (event.anonymous_id is None)


def _create(conn: Connection, ws: str, ids: list[Identity], now: datetime) -> ProfileId:
    pid = new_profile_id()
    repo.insert_profile(conn, ws, pid, now)
    for identity in ids:
        repo.attach_identity(conn, ws, pid, identity, now)
    return pid


def _resolve(conn: Connection, event: StoredEvent, now: datetime) -> tuple[ProfileId, ProfileId | None]:
    ws = event.workspace_id
    uid = Identity(IdentityKind.USER_ID, event.user_id) if event.user_id else None
    aid = Identity(IdentityKind.ANONYMOUS_ID, event.anonymous_id) if event.anonymous_id else None
    p_user = repo.owner_of(conn, ws, uid.kind, uid.value) if uid else None
    p_anon = repo.owner_of(conn, ws, aid.kind, aid.value) if aid else None

    if p_user is None and p_anon is None:
        return _create(conn, ws, [i for i in (uid, aid) if i], now), None
    if p_user is not None and (p_anon is None or p_anon == p_user):
        if aid is not None and p_anon is None:
            repo.attach_identity(conn, ws, p_user, aid, now)
        return p_user, None
    if p_user is None:
        assert p_anon is not None
        if uid is None:
            return p_anon, None
        if repo.has_kind(conn, ws, p_anon, IdentityKind.USER_ID):
            # The device belongs to someone else already: a new known person.
            return _create(conn, ws, [uid], now), None
        repo.attach_identity(conn, ws, p_anon, uid, now)
        return p_anon, None
    assert p_user is not None
    assert p_anon is not None
    if repo.has_kind(conn, ws, p_anon, IdentityKind.USER_ID):
        return p_user, None
    merge(conn, ws, p_anon, p_user, reason=event.type.value, message_id=event.message_id, now=now)
    return p_user, p_anon


def _resolve_alias(conn: Connection, event: StoredEvent, now: datetime) -> tuple[ProfileId, ProfileId | None]:
    ws = event.workspace_id
    assert event.user_id is not None
    previous = str(event.payload["previousId"])
    uid = Identity(IdentityKind.USER_ID, event.user_id)
    target = repo.owner_of(conn, ws, IdentityKind.USER_ID, event.user_id)
    source = repo.owner_of(conn, ws, IdentityKind.USER_ID, previous) or repo.owner_of(
        conn, ws, IdentityKind.ANONYMOUS_ID, previous
    )
    if target is None and source is None:
        # Neither is known yet: remember previousId as an anonymous id of the new person.
        return _create(conn, ws, [uid, Identity(IdentityKind.ANONYMOUS_ID, previous)], now), None
    if target is None:
        assert source is not None
        repo.attach_identity(conn, ws, source, uid, now)
        return source, None
    if source is None:
        repo.attach_identity(conn, ws, target, Identity(IdentityKind.ANONYMOUS_ID, previous), now)
        return target, None
    if source == target:
        return target, None
    merge(conn, ws, source, target, reason="alias", message_id=event.message_id, now=now)
    return target, source


def merge(
    conn: Connection,
    ws: str,
    from_id: ProfileId,
    into_id: ProfileId,
    *,
    reason: str,
    message_id: str | None,
    now: datetime,
) -> None:
    """Fold ``from_id`` into ``into_id``; see the module docstring for what moves."""
    # Lock in a fixed order so two concurrent merges cannot deadlock.
    first, second = sorted((from_id, into_id))
    a = repo.get(conn, ws, first, lock=True)
    b = repo.get(conn, ws, second, lock=True)
    assert a is not None
    assert b is not None
    source, target = (a, b) if a.id == from_id else (b, a)
    traits, times = merge_traits((target.traits, target.trait_times), (source.traits, source.trait_times))
    reach = reachability(traits)
    survivor = replace(
        target,
        traits=traits,
        trait_times=times,
        email=reach.email,
        phone=reach.phone,
        timezone=target.timezone or source.timezone,
        first_seen=earliest(target.first_seen, source.first_seen),
        last_seen=latest(target.last_seen, source.last_seen),
        event_count=target.event_count + source.event_count,
    )
    repo.move_identities(conn, ws, from_id, into_id)
    repo.move_group_memberships(conn, ws, from_id, into_id)
    consent.move_to(conn, ws, from_id, into_id, now)
    lists.move_members(conn, ws, from_id, into_id, now)
    tracking.reassign_events(conn, from_id, into_id)
    repo.save_state(conn, survivor, now)
    repo.mark_merged(conn, from_id, into_id, now)
    repo.record_merge(
        conn,
        ws,
        Merge(
            from_profile_id=from_id,
            into_profile_id=into_id,
            reason=reason,
            message_id=message_id,
            merged_at=now,
        ),
    )


# ---- reads ---------------------------------------------------------------------------


def get_profile(conn: Connection, workspace_id: str, profile_id: str) -> Profile:
    """The profile, following a merge redirect to the survivor."""
    profile = repo.get(conn, workspace_id, profile_id)
    if profile is None:
        raise NotFound("profile")
    if profile.merged_into is not None:
        survivor = repo.get(conn, workspace_id, profile.merged_into)
        if survivor is None:
            raise NotFound("profile")
        return survivor
    return profile


def recipients(
    conn: Connection, workspace_id: str, profile_ids: Sequence[str], channel: str
) -> dict[str, tuple[Profile | None, str | None]]:
    """For each profile id, what a send needs: the profile as :func:`get_profile` gives it
    (a merged-away id gives its survivor; ``None`` when erased) and the survivor's consent
    status on ``channel``; a few statements for all of them rather than three each."""
    found = repo.get_many(conn, workspace_id, profile_ids)
    survivors = repo.get_many(
        conn, workspace_id, sorted({p.merged_into for p in found.values() if p.merged_into is not None})
    )
    final: dict[str, Profile | None] = {}
    for pid in profile_ids:
        p = found.get(pid)
        if p is not None and p.merged_into is not None:
            p = survivors.get(p.merged_into)
        final[pid] = p
    kept = sorted({p.id for p in final.values() if p is not None})
    ids = repo.identities_of_many(conn, workspace_id, kept)
    statuses = consent.consent_statuses(conn, workspace_id, kept, channel)
    out: dict[str, tuple[Profile | None, str | None]] = {}
    for pid, p in final.items():
        if p is None:
            out[pid] = (None, None)
        else:
            out[pid] = (replace(p, identities=tuple(ids.get(p.id, ()))), statuses.get(p.id))
    return out


def lookup(
    conn: Connection,
    workspace_id: str,
    *,
    user_id: str | None = None,
    anonymous_id: str | None = None,
    email: str | None = None,
) -> Profile:
    pid: str | None = None
    if user_id is not None:
        pid = repo.owner_of(conn, workspace_id, IdentityKind.USER_ID, user_id)
    elif anonymous_id is not None:
        pid = repo.owner_of(conn, workspace_id, IdentityKind.ANONYMOUS_ID, anonymous_id)
    elif email is not None:
        normalised = normalise_email(email) or email.strip().lower()
        found = repo.find_by_email(conn, workspace_id, normalised)
        if found is None:
            raise NotFound("profile")
        return found
    if pid is None:
        raise NotFound("profile")
    return get_profile(conn, workspace_id, pid)


def find(conn: Connection, workspace_id: str, kind: str, value: str) -> ProfileId | None:
    """The (merged) profile of a ``user_id``, ``anonymous_id``, ``email`` or ``profile_id``,
    or ``None``: for imports and APIs that name people by any of their ids."""
    try:
        if kind == "user_id":
            return lookup(conn, workspace_id, user_id=value).id
        if kind == "anonymous_id":
            return lookup(conn, workspace_id, anonymous_id=value).id
        if kind == "email":
            return lookup(conn, workspace_id, email=value).id
        if kind == "profile_id":
            return get_profile(conn, workspace_id, value).id
    except NotFound:
        return None
    raise ValueError(f"unknown identifier kind {kind!r}")


def events_of(
    conn: Connection,
    workspace_id: str,
    profile_id: str,
    *,
    after: tuple[datetime, int] | None,
    limit: int,
) -> tuple[Profile, list[StoredEvent]]:
    profile = get_profile(conn, workspace_id, profile_id)
    return profile, tracking.events_for_profile(conn, [profile.id], after=after, limit=limit)


def search(
    conn: Connection,
    workspace_id: str,
    *,
    email: str | None,
    trait_equals: dict[str, str],
    after_id: str | None,
    limit: int,
) -> list[Profile]:
    if email is not None:
        email = normalise_email(email) or email.strip().lower()
    return repo.search(
        conn, workspace_id, email=email, trait_equals=trait_equals, after_id=after_id, limit=limit
    )


def export(conn: Connection, workspace_id: str, profile_id: str) -> dict[str, Any]:
    """Everything kept about a person, for a data-access request."""
    profile = get_profile(conn, workspace_id, profile_id)
    events: list[StoredEvent] = []
    after: tuple[datetime, int] | None = None
    while True:
        page = tracking.events_for_profile(conn, [profile.id], after=after, limit=1000)
        events.extend(page)
        if len(page) < 1000:
            break
        after = (page[-1].timestamp, page[-1].seq)
    return {
        "profile": profile,
        "merges": repo.merges_into(conn, workspace_id, profile.id),
        "groups": repo.groups_of(conn, workspace_id, profile.id),
        "events": events,
    }


def merges_of(conn: Connection, workspace_id: str, profile_id: str) -> list[Merge]:
    return repo.merges_into(conn, workspace_id, profile_id)


def groups_of(conn: Connection, workspace_id: str, profile_id: str) -> list[dict[str, Any]]:
    return repo.groups_of(conn, workspace_id, profile_id)


@dataclass(frozen=True, slots=True)
class Erasure:
    profile_id: ProfileId
    profiles_deleted: int
    events_deleted: int
    profile_ids: tuple[str, ...] = ()


def erase(conn: Connection, workspace_id: str, profile_id: str, *, secret: bytes, now: datetime) -> Erasure:
    """Delete a person: profile, tombstones, identities, events (even ones still pending
    in the log), group memberships and merge records. Keep only keyed hashes of the
    identities so that a later re-import of the same person is suppressed."""
    locks.erasure(conn)  # waits for pipeline batches in flight (storage/locks.py)
    profile = get_profile(conn, workspace_id, profile_id)
    ids = [profile.id, *repo.merged_ids(conn, workspace_id, profile.id)]
    values: list[tuple[str, str]] = []
    for pid in ids:
        for ident in repo.identities_of(conn, workspace_id, pid):
            values.append((ident.kind.value, ident.value))
    if profile.email:
        values.append(("email", profile.email))
    repo.record_erasure(conn, workspace_id, erasure_hashes(secret, workspace_id, values), now)
    user_ids = [v for k, v in values if k == IdentityKind.USER_ID.value]
    anonymous_ids = [v for k, v in values if k == IdentityKind.ANONYMOUS_ID.value]
    deleted = tracking.delete_events_of_person(conn, workspace_id, ids, user_ids, anonymous_ids)
    consent.delete_for(conn, workspace_id, ids)
    lists.delete_for(conn, workspace_id, ids)
    rechecks.forget(conn, workspace_id, ids)
    repo.delete_person(conn, workspace_id, ids)
    return Erasure(
        profile_id=profile.id, profiles_deleted=len(ids), events_deleted=deleted, profile_ids=tuple(ids)
    )


class Emit(Protocol):
    """Append a system event to the person's log; ``cause`` makes its message id (the same
    cause never emits the same event twice). ``at``, when given, is a time that belongs to
    the cause (the same whenever that cause is announced again, such as a timer's due
    time or the cause event's receipt): it leads the message id, so system events of
    later causes sort after earlier ones in the log's message-id index. The pipeline's
    ``emit`` with its partitions bound (``functools.partial(emit, partitions=n)``) is
    one; segments and scoring take one to announce entries, exits and threshold
    crossings."""

    def __call__(
        self,
        conn: Connection,
        ws: str,
        profile_id: str,
        name: str,
        properties: dict[str, Any],
        *,
        now: datetime,
        cause: str,
        at: datetime | None = None,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class SystemEvent:
    """An event the system observed about a person (an email click, a score threshold, a
    segment entry), to append to their log under ``message_id``."""

    profile_id: str
    name: str
    properties: dict[str, Any]
    message_id: str


#: People looked up per query, and events appended per statement, by :func:`emit_events`.
EMIT_CHUNK = 5000


def emit_events(
    conn: Connection,
    workspace_id: str,
    items: Sequence[SystemEvent],
    *,
    library: str,
    now: datetime,
    partitions: int,
) -> int:
    """Append system events to the people's logs, each under one of its person's ids so the
    pipeline attributes it to them (a person merged away speaks through the survivor; one
    erased or without ids is skipped), with a few queries per chunk of people and one
    executemany per chunk of events. Returns how many were newly stored (a message id
    already in the log is not stored twice)."""
    senders = repo.senders(conn, workspace_id, [i.profile_id for i in items])
    return _emit(conn, workspace_id, items, senders, library=library, now=now, partitions=partitions)


def _emit(
    conn: Connection,
    workspace_id: str,
    items: Sequence[SystemEvent],
    senders: Mapping[str, tuple[str | None, str | None]],
    *,
    library: str,
    now: datetime,
    partitions: int,
) -> int:
    calls: list[tracking.SystemCall] = []
    stamp = now.isoformat()  # the same for every call of the batch
    for item in items:
        sender = senders.get(item.profile_id)
        if sender is None:
            continue
        user_id, anonymous_id = sender
        payload: dict[str, Any] = {
            "type": "track",
            "event": item.name,
            "messageId": item.message_id,
            "properties": item.properties,
            "timestamp": stamp,
            "receivedAt": stamp,
            "context": {"library": {"name": library}},
        }
        if user_id:
            payload["userId"] = user_id
        else:
            payload["anonymousId"] = anonymous_id
        calls.append(tracking.SystemCall(item.message_id, item.name, user_id, anonymous_id, payload))
    return sum(
        tracking.emit_many(conn, workspace_id, calls[i : i + EMIT_CHUNK], now=now, partitions=partitions)
        for i in range(0, len(calls), EMIT_CHUNK)
    )


def emit_event(
    conn: Connection,
    workspace_id: str,
    profile_id: str,
    name: str,
    properties: dict[str, Any],
    *,
    message_id: str,
    library: str,
    now: datetime,
    partitions: int,
) -> bool:
    """Append one system event (see :func:`emit_events`). False when the person no longer
    exists or has no id."""
    senders = repo.senders(conn, workspace_id, [profile_id])
    if profile_id not in senders:
        return False
    item = SystemEvent(profile_id, name, properties, message_id)
    _emit(conn, workspace_id, [item], senders, library=library, now=now, partitions=partitions)
    return True

"""Erasing a session or a user from both tiers, leaving an audit row without content.

Order matters. The sessions' leases are taken first, so no consolidation can archive their turns
again between the two tiers. The hot keys go next: if the database step then fails, running the
command again finishes the job, whereas the other order would leave hot state that the next pass
archives all over again. The database side is one transaction, audit row included.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from redis.asyncio import Redis
from sqlalchemy import ColumnElement, Executable, delete, false, insert, or_, select, true
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker.archive.tables import erasures, gaps, quarantine, sessions, summaries, turns
from worker.config import LayoutName, Settings
from worker.domain import SessionRef
from worker.hot.exclusive import holding
from worker.hot.keys import KeyPattern, glob_escape
from worker.hot.scanner import scan_keys


class AmbiguousSession(ValueError):
    """One session id is held by the keys of several users: whose is to be erased?"""


@dataclass(frozen=True, slots=True)
class ErasureCounts:
    sessions: int = 0
    turns: int = 0
    summaries: int = 0
    gaps: int = 0
    quarantine: int = 0
    hot_keys: int = 0

    def as_json(self) -> dict[str, int]:
        return asdict(self)


def subject_digest(subject_id: str) -> str:
    """How the audit names a subject: anyone holding the id can check it was erased."""
    return hashlib.sha256(subject_id.encode()).hexdigest()


async def forget_session(
    redis: Redis,
    engine: AsyncEngine,
    settings: Settings,
    session_id: str,
    user_id: str | None = None,
) -> ErasureCounts:
    """Erase one session everywhere; with `user_id`, that user's session of this id only.
    Idempotent: a second run deletes nothing, audits again.

    Where the key names the user (ADK's), two users may have chosen one id: their
    conversations are different sessions, so an id alone held by both is refused
    (AmbiguousSession) rather than both erased."""
    pattern = KeyPattern.compile(settings.pattern)
    async with engine.connect() as conn:
        archived = await _archived_refs(conn, sessions.c.session_id == session_id)
        quarantined = (
            await conn.execute(
                select(quarantine.c.redis_key, quarantine.c.user_id).where(
                    quarantine.c.session_id == session_id, quarantine.c.user_id.is_not(None)
                )
            )
        ).all()
        quarantined_users = {user for _, user in quarantined}
    if "{app}" in settings.pattern or "{user}" in settings.pattern:
        # The key has parts the id alone does not give (ADK's app and user): look for it.
        by_id = KeyPattern.compile(settings.pattern, id_glob=glob_escape(session_id))
        hot: list[SessionRef] = []
        async for batch in scan_keys(redis, by_id, settings.scan_count):
            hot += [r for r in batch if r.session_id == session_id and not _adk_state(settings, r)]
    else:
        hot = [SessionRef(session_id, pattern.key_for(session_id))]
    spared: list[SessionRef] = []
    if user_id is not None:
        hot = [ref for ref in hot if ref.user in (None, user_id)]
        if any(ref.user is None for ref in hot):
            # The key does not name its user (the list layout): the archive, the metadata
            # hash, or the key's quarantine record says whose it is. Another user's session
            # is not this erasure's to touch.
            owners = await _metadata_owners(redis, settings, hot)
            claimed = {ref.user for ref in archived} | set(owners) | quarantined_users
            if claimed - {None, user_id}:
                spared = [ref for ref in hot if ref.user is None]
                hot = [ref for ref in hot if ref.user is not None]
    elif len({ref.user for ref in archived + hot if ref.user is not None} | quarantined_users) > 1:
        keys = sorted({ref.key for ref in archived + hot} | {key for key, _ in quarantined})
        raise AmbiguousSession(
            f"session {session_id!r} belongs to more than one user ({', '.join(keys)}); "
            "add --user to say whose"
        )
    refs = _owned_by(archived, user_id) + hot
    # The id itself too: a quarantined session whose key expired is neither archived nor hot.
    return await _forget(
        redis,
        engine,
        settings,
        "session",
        session_id,
        refs,
        owner=user_id,
        ids=[session_id],
        spared=spared,
    )


async def forget_user(
    redis: Redis, engine: AsyncEngine, settings: Settings, user_id: str
) -> ErasureCounts:
    """Erase every session of a user: those archived under the user, and hot ones whose key
    (ADK's `{user}`) or metadata hash (`user_id`) names the user."""
    async with engine.connect() as conn:
        refs = await _archived_refs(conn, sessions.c.user_id == user_id)
    refs += await _hot_refs_of_user(redis, settings, user_id)
    return await _forget(
        redis,
        engine,
        settings,
        "user",
        user_id,
        refs,
        owner=user_id,
        every_session=True,
        also=await _adk_user_state_keys(redis, settings, user_id),
    )


def _owned_by(refs: list[SessionRef], owner: str | None) -> list[SessionRef]:
    """The archived sessions an erasure for `owner` may touch: its own and those that name no
    user; never another user's that happens to share a session id."""
    return [ref for ref in refs if owner is None or ref.user in (None, owner)]


async def _forget(
    redis: Redis,
    engine: AsyncEngine,
    settings: Settings,
    kind: str,
    subject: str,
    refs: list[SessionRef],
    owner: str | None,
    every_session: bool = False,
    also: Sequence[str] = (),
    ids: Sequence[str] = (),
    spared: Sequence[SessionRef] = (),
) -> ErasureCounts:
    pattern = KeyPattern.compile(settings.pattern)
    session_keys = {ref.key for ref in refs}
    # The key the configured pattern gives too: the archived one may predate a prefix change.
    session_keys |= {pattern.key_for(ref.session_id, ref.app, ref.user) for ref in refs}
    hot_keys = set(session_keys) | set(also)
    if settings.metadata_pattern:
        hot_keys |= {settings.metadata_pattern.replace("{id}", ref.session_id) for ref in refs}
    # Another user's live session under this id (its metadata or quarantine record says so):
    # an archived ref of nobody's must not bring its key back into the erasure.
    hot_keys -= {ref.key for ref in spared}
    if settings.metadata_pattern:
        hot_keys -= {settings.metadata_pattern.replace("{id}", ref.session_id) for ref in spared}
    ids = sorted({ref.session_id for ref in refs} | set(ids))
    lease_ms = int(settings.lease_ttl_s * 1000)
    async with holding(redis, session_keys, lease_ms, wait_s=settings.lease_ttl_s + 2):
        # One DEL per key: keys of different sessions may live on different cluster nodes.
        deleted = 0
        for key in sorted(hot_keys):
            deleted += int(await redis.delete(key))
        async with engine.begin() as conn:
            counts = await _erase_archive(
                conn, ids, sorted(session_keys), owner, every_session, deleted
            )
            await conn.execute(
                insert(erasures).values(
                    subject_kind=kind,
                    subject_sha256=subject_digest(subject),
                    sessions_deleted=counts.sessions,
                    turns_deleted=counts.turns,
                    summaries_deleted=counts.summaries,
                    gaps_deleted=counts.gaps,
                    quarantine_deleted=counts.quarantine,
                    hot_keys_deleted=counts.hot_keys,
                )
            )
    return counts


async def _erase_archive(
    conn: AsyncConnection,
    ids: list[str],
    keys: list[str],
    owner: str | None,
    every_session: bool,
    hot_keys_deleted: int,
) -> ErasureCounts:
    if every_session:
        # Sessions archived for the user since the keys were gathered go too (their hot keys
        # were not known then: a second run deletes those).
        rows = await conn.execute(
            select(sessions.c.session_id).where(sessions.c.user_id == owner).with_for_update()
        )
        ids = sorted({*ids, *rows.scalars()})
    asked = ids
    if owner is not None:
        # A hot key of the user's may carry the id of another user's archived session (two ADK
        # users, one id: the second is quarantined): that archive is not the user's to erase.
        others = await conn.execute(
            select(sessions.c.session_id)
            .where(
                sessions.c.session_id.in_(ids),
                sessions.c.user_id.is_not(None),
                sessions.c.user_id != owner,
            )
            .with_for_update()
        )
        ids = sorted(set(ids) - set(others.scalars()))

    async def count(stmt: Executable) -> int:
        return int((await conn.execute(stmt)).rowcount)

    # Children before the session rows (whose cascade would do it, but without counts).
    return ErasureCounts(
        turns=await count(delete(turns).where(turns.c.session_id.in_(ids))),
        summaries=await count(delete(summaries).where(summaries.c.session_id.in_(ids))),
        gaps=await count(delete(gaps).where(gaps.c.session_id.in_(ids))),
        quarantine=await count(
            # The ids as asked: the user's own quarantined key under another user's archived
            # id (an id collision) is the user's to erase; the records say whose each is.
            delete(quarantine).where(_quarantine_records(asked, keys, owner, every_session))
        ),
        sessions=await count(delete(sessions).where(sessions.c.session_id.in_(ids))),
        hot_keys=hot_keys_deleted,
    )


def _quarantine_records(
    ids: list[str], keys: list[str], owner: str | None, every_session: bool
) -> ColumnElement[bool]:
    """The quarantine records (and the copies they keep) an erasure deletes: its keys', its
    sessions' unless another user's (one id, two users), and with `every_session` every one
    naming the user: a quarantined session whose key expired was never archived, and no key
    is left to find it by."""
    theirs = quarantine.c.user_id.is_not(None) & (quarantine.c.user_id != owner)
    mine = ~theirs if owner is not None else true()
    return or_(
        quarantine.c.redis_key.in_(keys) & mine,
        quarantine.c.session_id.in_(ids) & mine,
        quarantine.c.user_id == owner if every_session else false(),
    )


async def _archived_refs(conn: AsyncConnection, where: ColumnElement[bool]) -> list[SessionRef]:
    rows = await conn.execute(
        select(
            sessions.c.session_id, sessions.c.redis_key, sessions.c.app_name, sessions.c.user_id
        ).where(where)
    )
    return [SessionRef(sid, key, app, user) for sid, key, app, user in rows]


async def _hot_refs_of_user(redis: Redis, settings: Settings, user_id: str) -> list[SessionRef]:
    """A full SCAN (erasure is rare, and must not miss a session not yet archived)."""
    pattern = KeyPattern.compile(settings.pattern)
    found: list[SessionRef] = []
    async for batch in scan_keys(redis, pattern, settings.scan_count):
        batch = [ref for ref in batch if not _adk_state(settings, ref)]
        found += [ref for ref in batch if ref.user == user_id]
        unnamed = [ref for ref in batch if ref.user is None]
        owners = await _metadata_owners(redis, settings, unnamed)
        found += [ref for ref, owner in zip(unnamed, owners, strict=True) if owner == user_id]
    return found


async def _metadata_owners(
    redis: Redis, settings: Settings, refs: list[SessionRef]
) -> list[str | None]:
    """The `user_id` each session's metadata hash names (None: no hash, or no such field);
    one pipeline for them all."""
    if not settings.metadata_pattern or not refs:
        return [None] * len(refs)
    async with redis.pipeline(transaction=False) as pipe:
        for ref in refs:
            pipe.hget(settings.metadata_pattern.replace("{id}", ref.session_id), "user_id")
        owners = await pipe.execute()
    return [o.decode("utf-8", "replace") if isinstance(o, bytes) else o for o in owners]


# ADK keeps a user's own state (`user:` keys: a name, an email) beside the sessions, at
# `{prefix}user_state:{app}:{user}`, and the app's at `{prefix}app_state:{app}`.
_ADK_STATE = ("user_state", "app_state")


def _adk_state(settings: Settings, ref: SessionRef) -> bool:
    """Whether the pattern took one of ADK's state values for a session (app `user_state`)."""
    return settings.layout is LayoutName.ADK and ref.app in _ADK_STATE


async def _adk_user_state_keys(redis: Redis, settings: Settings, user_id: str) -> list[str]:
    """The user's ADK state values, in every app: personal data an erasure must not leave."""
    prefix, app, _ = settings.pattern.partition("{app}")
    if settings.layout is not LayoutName.ADK or not app:
        return []
    start = f"{prefix}user_state:"
    glob = f"{glob_escape(start)}*:{glob_escape(user_id)}"
    keys = [
        key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else str(key)
        async for key in redis.scan_iter(match=glob, count=settings.scan_count)
    ]
    # `*` crosses colons: user_state:app:team:bob is user "team:bob"'s, not bob's.
    return [key for key in keys if ":" not in key[len(start) : -len(user_id) - 1]]

"""Dead letters: find, replay and purge the entries of ``<stream>:dlq``.

The worker moves an entry it can never store to ``<stream>:dlq`` with the fields of
``constants.DLQ_FIELDS``: reason, error, stream, id, deliveries, event (the original
payload bytes), consumer and ts (ms since the epoch): the wire form of
``worker.deadletter.DeadLetter``. This module reads them back with filters (reason,
workspace, time range, IDs, limit), re-enqueues them, or deletes them.

Replay is crash-safe by ordering: the original payload is XADDed to the source stream
first, and the dead letter is XDELed only after Redis confirmed that XADD. A crash in
between leaves the event in both places, so it is written twice and the idempotent
store merge absorbs the duplicate; it is never in neither.

Every command streams: dead letters are read in pages (XRANGE with COUNT, the cursor
the last ID read) of at most 500 entries and about ``_PAGE_BYTES`` at the largest payload
seen so far (the first page takes one entry), and replayed in chunks of at most 100
entries or ``_PAGE_BYTES``, so memory does not grow with the number of dead letters
(200,000 of them took 880 MB when they were collected first). A replay reads only up to
the newest dead letter at its start: what it replays and fails again is dead-lettered
anew, after that point, and is not replayed a second time by the same run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from . import constants as c
from .deadletter import DeadLetter
from .redisio import parse_id, text

#: JSON schema version of ``dlq ... --json``.
DLQ_SCHEMA_VERSION = 1

_PAGE = 500
#: Payload bytes one XRANGE page (at the largest payload seen) and one replay chunk hold.
_PAGE_BYTES = 8 * 1024 * 1024
_REPLAY_BATCH = 100
_SHOW_PREVIEW_CHARS = 4000


@dataclass(frozen=True, slots=True)
class DlqFilter:
    """Which dead letters a command acts on. Empty tuples and None mean "any"."""

    reasons: tuple[str, ...] = ()
    workspaces: tuple[str, ...] = ()
    since_ms: int | None = None
    until_ms: int | None = None
    ids: tuple[str, ...] = ()
    limit: int | None = None

    def matches(self, entry: DeadLetter) -> bool:
        if self.reasons and entry.reason not in self.reasons:
            return False
        if self.ids and entry.id not in self.ids:
            return False
        when = entry.dead_lettered_ms
        if self.since_ms is not None and when < self.since_ms:
            return False
        if self.until_ms is not None and when > self.until_ms:
            return False
        return not self.workspaces or entry.workspace in self.workspaces


async def scan(
    redis: aioredis.Redis, stream: str, flt: DlqFilter = DlqFilter(),
    *, end_id: str | None = None,
) -> AsyncIterator[DeadLetter]:
    """Matching entries of ``stream``'s dead-letter stream, oldest first, paged by XRANGE
    (at most ``end_id`` when given).

    The time range is the XRANGE itself (a dead-letter ID holds the time it was
    dead-lettered); the other filters are applied to each entry. A page holds at most
    ``_PAGE`` entries and about ``_PAGE_BYTES`` at the largest payload seen (the first
    page one entry): what is held at once does not grow with the stream.
    """
    dlq = c.dlq_key(stream)
    if flt.ids:
        for entry_id in sorted(set(flt.ids), key=_id_key):
            found: list[Any] = await redis.xrange(dlq, entry_id, entry_id) or []
            for got_id, fields in found:
                entry = DeadLetter.from_fields(dlq, got_id, fields or {})
                if flt.matches(entry):
                    yield entry
        return
    start = "-" if flt.since_ms is None else str(max(0, flt.since_ms))
    end = "+" if flt.until_ms is None else str(max(0, flt.until_ms))
    if end_id is not None and (end == "+" or _id_key(end_id) < (int(end), _MAX_SEQ)):
        end = end_id
    count, largest = 1, 0
    while True:
        page: list[Any] = await redis.xrange(dlq, start, end, count=count) or []
        for got_id, fields in page:
            entry = DeadLetter.from_fields(dlq, got_id, fields or {})
            largest = max(largest, len(entry.event or b""))
            if flt.matches(entry):
                yield entry
        if len(page) < count:
            return
        start = "(" + text(page[-1][0])
        count = max(1, min(_PAGE, _PAGE_BYTES // max(largest, 1)))
        del page, entry  # not held while the next page arrives: one page at a time


_MAX_SEQ = 2**64 - 1

#: The newest entry's ID without sending its fields (a payload can be 16 MiB).
_NEWEST_ID = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if last then return last[1] end
return false
"""


async def newest_id(redis: aioredis.Redis, stream: str) -> str | None:
    """The ID of the newest dead letter of ``stream``, or None when there is none."""
    found = await redis.eval(_NEWEST_ID, 1, c.dlq_key(stream))
    return text(found) if found else None


async def scan_all(
    redis: aioredis.Redis, streams: Sequence[str], flt: DlqFilter = DlqFilter(),
    *, snapshot: bool = False,
) -> AsyncIterator[DeadLetter]:
    """Matching entries across the dead-letter streams of ``streams``, at most
    ``flt.limit``. With ``snapshot``, each stream only up to its newest dead letter at the
    time it is reached (what is dead-lettered meanwhile is left for a later run)."""
    seen = 0
    for stream in streams:
        end_id = await newest_id(redis, stream) if snapshot else None
        if snapshot and end_id is None:
            continue
        async for entry in scan(redis, stream, flt, end_id=end_id):
            if flt.limit is not None and seen >= flt.limit:
                return
            seen += 1
            yield entry


def _id_key(entry_id: str) -> tuple[int, int]:
    try:
        return parse_id(entry_id)
    except ValueError:
        return (0, 0)


async def find(
    redis: aioredis.Redis, streams: Sequence[str], flt: DlqFilter = DlqFilter()
) -> list[DeadLetter]:
    """Matching entries across the dead-letter streams of ``streams``, at most ``flt.limit``
    (all in memory: for ``list`` and ``show``; the other commands stream)."""
    return [entry async for entry in scan_all(redis, streams, flt)]


@dataclass(slots=True)
class ReplayResult:
    """``replayed`` maps a dead-letter ID to the new ID in the source stream."""

    replayed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


async def replay(
    redis: aioredis.Redis, entries: Iterable[DeadLetter], *, batch: int = _REPLAY_BATCH
) -> ReplayResult:
    """Re-enqueue each entry's original payload to its source stream, then delete it.

    XADD (pipelined per batch) first; XDEL only the entries whose XADD Redis confirmed.
    Entries without a payload field are skipped and stay in the dead-letter stream.
    """
    result = ReplayResult()
    async for part in _replay_chunks(redis, _aiter(entries), batch):
        result.replayed.update(part.replayed)
        result.skipped.extend(part.skipped)
        result.failed.update(part.failed)
    return result


async def _aiter(entries: Iterable[DeadLetter]) -> AsyncIterator[DeadLetter]:
    for entry in entries:
        yield entry


def replay_matching(
    redis: aioredis.Redis, streams: Sequence[str], flt: DlqFilter = DlqFilter(),
    *, batch: int = _REPLAY_BATCH,
) -> AsyncIterator[ReplayResult]:
    """Replay the matching dead letters chunk by chunk, as :func:`replay` does, while
    reading them (:func:`scan_all` with ``snapshot``): one result per chunk, so nothing
    grows with the number of dead letters."""
    return _replay_chunks(redis, scan_all(redis, streams, flt, snapshot=True), batch)


async def _replay_chunks(
    redis: aioredis.Redis, entries: AsyncIterator[DeadLetter], batch: int
) -> AsyncIterator[ReplayResult]:
    """Chunks of at most ``batch`` entries or about ``_PAGE_BYTES``, each settled (XADD,
    replies checked, XDEL of the confirmed) before the next is read."""
    chunk: list[DeadLetter] = []
    size = 0
    async for entry in entries:
        if entry.event is None:
            yield ReplayResult(skipped=[entry.id])
            continue
        chunk.append(entry)
        size += len(entry.event)
        if len(chunk) >= batch or size >= _PAGE_BYTES:
            yield await _replay_chunk(redis, chunk)
            chunk, size = [], 0
    if chunk:
        yield await _replay_chunk(redis, chunk)


async def _replay_chunk(redis: aioredis.Redis, chunk: list[DeadLetter]) -> ReplayResult:
    result = ReplayResult()
    async with redis.pipeline(transaction=False) as pipe:
        for entry in chunk:
            fields: dict[Any, Any] = {c.EVENT_FIELD: entry.event or b""}
            if entry.sig is not None:
                fields[c.SIG_FIELD] = entry.sig
            pipe.xadd(entry.source_stream, fields)
        added = await pipe.execute(raise_on_error=False)
    enqueued: list[tuple[DeadLetter, str]] = []
    for entry, new_id in zip(chunk, added, strict=True):
        if isinstance(new_id, Exception):
            result.failed[entry.id] = str(new_id)
        else:
            enqueued.append((entry, text(new_id)))
    if enqueued:
        await _delete_replayed(redis, enqueued)
        result.replayed.update({entry.id: new_id for entry, new_id in enqueued})
    return result


async def _delete_replayed(
    redis: aioredis.Redis, enqueued: list[tuple[DeadLetter, str]]
) -> None:
    """Second step of a replay: only after the XADDs above succeeded."""
    by_dlq: dict[str, list[str]] = {}
    for entry, _ in enqueued:
        by_dlq.setdefault(entry.dlq, []).append(entry.id)
    for dlq, ids in by_dlq.items():
        await redis.xdel(dlq, *ids)


async def purge(
    redis: aioredis.Redis, entries: Iterable[DeadLetter] | AsyncIterator[DeadLetter]
) -> int:
    """Delete ``entries`` from their dead-letter streams, ``_PAGE`` IDs per XDEL, while
    reading them; the number deleted."""
    stream = entries if isinstance(entries, AsyncIterator) else _aiter(entries)
    deleted = 0
    by_dlq: dict[str, list[str]] = {}
    async for entry in stream:
        ids = by_dlq.setdefault(entry.dlq, [])
        ids.append(entry.id)
        if len(ids) >= _PAGE:
            deleted += int(await redis.xdel(entry.dlq, *ids))
            ids.clear()
    for dlq, ids in by_dlq.items():
        if ids:
            deleted += int(await redis.xdel(dlq, *ids))
    return deleted

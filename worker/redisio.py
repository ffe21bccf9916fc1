"""Small Redis helpers shared by the worker loops: groups, entries, dead letters, ACKs.

This is the Redis edge: redis-py errors are translated here, once, into the project's
own (:class:`~worker.errors.RedisUnavailable`: back off and retry;
:class:`~worker.errors.RedisRefused`: this command will not succeed as sent). The loops
above never look at Redis error strings.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import (
    AskError,
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import constants as c
from .errors import RedisRefused, RedisUnavailable


@dataclass(slots=True)
class Entry:
    """One stream entry held by this worker until it is acknowledged."""

    stream: str
    id: str
    payload: bytes | None
    deliveries: int = 1
    #: Further ``event`` fields of the same entry (an ambiguous entry, dead-lettered whole).
    extra_payloads: tuple[bytes, ...] = ()
    #: The ``sig`` field (``worker.signing``), when the producer signed the event.
    sig: bytes | None = None

    @property
    def id_ms(self) -> int:
        """Milliseconds part of the entry ID: when the producer appended it."""
        return int(self.id.split("-", 1)[0])


@dataclass(slots=True)
class DeadLetter:
    entry: Entry
    reason: str
    error: str


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def is_nogroup(exc: BaseException) -> bool:
    """The group (or its stream) is gone: Redis restarted empty, FLUSHALL, or DEL.

    A blocked XREADGROUP whose stream is deleted is answered with ``UNBLOCKED``.
    """
    return isinstance(exc, ResponseError) and str(exc).startswith(("NOGROUP", "UNBLOCKED"))


#: redis-py's own classes of errors that pass once Redis (or the cluster) recovers.
_UNAVAILABLE_CLASSES: tuple[tuple[type[BaseException], str], ...] = (
    (BusyLoadingError, "loading"),  # ConnectionError subclasses: matched before it
    (AuthenticationError, "auth"),
    (RedisTimeoutError, "timeout"),
    (RedisConnectionError, "connection"),
    (OSError, "connection"),
    (OutOfMemoryError, "oom"),
    (MovedError, "moved"),
    (AskError, "moved"),
    (TryAgainError, "cluster"),
    (ClusterDownError, "cluster"),
    (MasterDownError, "cluster"),
    (ReadOnlyError, "readonly"),
)

#: Reply prefixes of other errors that pass on their own (redis-py keeps the prefix).
_UNAVAILABLE_PREFIXES = {"BUSY": "busy", "NOREPLICAS": "cluster"}


def translate(exc: BaseException) -> RedisUnavailable | RedisRefused | None:
    """The project's error for a redis-py error, or None if it is not one to translate
    (NOGROUP is left to :func:`is_nogroup`; non-Redis errors are not Redis's to judge)."""
    if isinstance(exc, RedisUnavailable | RedisRefused):
        return exc
    for cls, kind in _UNAVAILABLE_CLASSES:
        if isinstance(exc, cls):
            return RedisUnavailable(kind, str(exc))
    if not isinstance(exc, RedisError) or is_nogroup(exc):
        return None
    message = str(exc)
    head = message.split(" ", 1)[0]
    if head in _UNAVAILABLE_PREFIXES:
        return RedisUnavailable(_UNAVAILABLE_PREFIXES[head], message)
    if isinstance(exc, ResponseError):
        return RedisRefused("wrongtype" if head == "WRONGTYPE" else "refused", message)
    return RedisUnavailable("other", message)


@contextmanager
def translated() -> Iterator[None]:
    """Raise redis-py errors raised inside as the project's own (see :func:`translate`)."""
    try:
        yield
    except (RedisError, OSError) as exc:
        mapped = translate(exc)
        if mapped is None:
            raise
        raise mapped from exc


async def read_group(
    redis: aioredis.Redis,
    group: str,
    consumer: str,
    streams: Sequence[str],
    count: int,
    block_ms: int | None,
) -> list[Entry]:
    """``XREADGROUP GROUP g c COUNT n BLOCK ms STREAMS s… >…``: new entries for ``consumer``.

    The command name is passed as ``"XREADGROUP GROUP"``: redis-py sends exactly the
    same command (it splits the first argument on spaces) but finds no response
    callback for that name, so the reply is parsed straight from the wire instead of
    through a dict per entry and a list of tuples per stream first (a few per cent of
    a worker's CPU at full speed).
    """
    args: list[Any] = [group, consumer, "COUNT", count]
    if block_ms is not None:
        args += ["BLOCK", block_ms]
    args += ["STREAMS", *streams, *([">"] * len(streams))]
    with translated():
        # redis-py leaves execute_command untyped; the reply is parsed just below.
        reply = await redis.execute_command("XREADGROUP GROUP", *args)  # type: ignore[no-untyped-call]
    return entries_from_read(reply)


def entries_from_read(response: Any) -> list[Entry]:
    """Entries of an XREADGROUP reply (RESP2 list or RESP3 map), parsed by redis-py or raw."""
    items = response.items() if isinstance(response, dict) else response or ()
    out: list[Entry] = []
    for stream, messages in items:
        name = text(stream)
        if (isinstance(messages, list) and messages and isinstance(messages[0], list)
                and (not messages[0] or isinstance(messages[0][0], list | tuple))):
            messages = messages[0]  # RESP3 wraps the list once more
        for entry_id, fields in messages:
            payload, *extra = _payloads(fields) or (None,)
            out.append(Entry(name, text(entry_id), payload, extra_payloads=tuple(extra),
                             sig=_sig(fields)))
    return out


_EVENT_KEYS = (c.EVENT_FIELD.encode(), c.EVENT_FIELD)
_SIG_KEYS = (c.SIG_FIELD.encode(), c.SIG_FIELD)


def _payloads(fields: Any) -> list[bytes]:
    """The values of the entry's ``event`` field(s), in order; other fields are ignored.

    A raw reply (``[field, value, field, value, …]``) keeps every value, so an entry
    with two ``event`` fields is seen as ambiguous instead of one silently winning.
    """
    if not fields:
        return []
    if isinstance(fields, dict):
        value = fields.get(_EVENT_KEYS[0])
        values = [fields.get(_EVENT_KEYS[1])] if value is None else [value]
    else:
        values = [fields[i + 1] for i in range(0, len(fields) - 1, 2)
                  if fields[i] in _EVENT_KEYS]
    return [v.encode() if isinstance(v, str) else v for v in values
            if isinstance(v, str | bytes)]


def _sig(fields: Any) -> bytes | None:
    """The entry's ``sig`` field (the last one, as in a dict), if any."""
    if not fields:
        return None
    if isinstance(fields, dict):
        value = fields.get(_SIG_KEYS[0])
        if value is None:
            value = fields.get(_SIG_KEYS[1])
    else:
        value = None
        for i in range(0, len(fields) - 1, 2):
            if fields[i] in _SIG_KEYS:
                value = fields[i + 1]
    if isinstance(value, str):
        return value.encode()
    return value if isinstance(value, bytes) else None


async def ensure_group(redis: aioredis.Redis, stream: str, group: str) -> bool:
    """Create the group from ID 0 (entries added before it are not skipped).

    Returns True if it was created, False if it existed. At ``maxmemory`` Redis refuses
    XGROUP CREATE: that raises :class:`RedisUnavailable` (``oom``) like any outage.
    """
    try:
        with translated():
            await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except RedisRefused as exc:
        if exc.detail.startswith("BUSYGROUP"):
            return False
        raise
    except RedisUnavailable as exc:
        # At maxmemory XGROUP CREATE is refused even for a group that exists (the memory
        # check comes first): a worker restarted then must still start.
        if exc.kind == "oom" and await group_exists(redis, stream, group):
            return False
        raise
    return True


async def group_exists(redis: aioredis.Redis, stream: str, group: str) -> bool:
    """Whether ``stream`` has the consumer group ``group`` (XINFO GROUPS: served at maxmemory)."""
    try:
        with translated():
            groups = await redis.xinfo_groups(stream)
    except RedisRefused as exc:
        if "no such key" in exc.detail.lower():
            return False
        raise
    return any(text(g["name"]) == group for g in groups)


def dead_letter_fields(dead: DeadLetter, consumer: str) -> dict[Any, Any]:
    return {
        "reason": dead.reason,
        "error": dead.error[:2000],
        "stream": dead.entry.stream,
        "id": dead.entry.id,
        "deliveries": dead.entry.deliveries,
        "event": dead.entry.payload if dead.entry.payload is not None else b"",
        "consumer": consumer,
        "ts": int(time.time() * 1000),
        **({c.SIG_FIELD: dead.entry.sig} if dead.entry.sig is not None else {}),
    } | {f"{c.EVENT_FIELD}_{n}": extra for n, extra in enumerate(dead.entry.extra_payloads, 2)}


async def write_dead_letters(
    redis: aioredis.Redis, consumer: str, dead: Sequence[DeadLetter]
) -> list[tuple[DeadLetter, RedisUnavailable | RedisRefused]]:
    """XADD every dead letter (one pipelined round trip) and check each reply.

    Returns the dead letters Redis did not confirm, each with its error (OOM at
    ``maxmemory``, WRONGTYPE when the key holds another type, MOVED in a cluster …);
    their entries must stay pending. A lost connection raises :class:`RedisUnavailable`.
    """
    if not dead:
        return []
    with translated():
        async with redis.pipeline(transaction=False) as pipe:
            for d in dead:
                pipe.xadd(c.dlq_key(d.entry.stream), dead_letter_fields(d, consumer))
            results = await pipe.execute(raise_on_error=False)
    refused: list[tuple[DeadLetter, RedisUnavailable | RedisRefused]] = []
    for d, result in zip(dead, results, strict=True):
        if isinstance(result, BaseException):
            error = translate(result) or RedisRefused("refused", str(result))
            refused.append((d, error))
    return refused


async def dead_lettered_ids(
    redis: aioredis.Redis, stream: str, entries: Sequence[Entry], scan_limit: int = 10_000
) -> set[str]:
    """IDs among ``entries`` (all of ``stream``) that already have a dead letter.

    A dead letter is written after its entry was appended, so the search starts at the
    oldest entry's time and reads at most ``scan_limit`` dead letters (a bound, not a
    guarantee, on a huge dead-letter stream). Used before dead-lettering an entry that
    was delivered before: a worker may have died between the XADD and the XACK.
    """
    wanted = {e.id for e in entries}
    found: set[str] = set()
    start: str = f"{min(e.id_ms for e in entries)}-0"
    scanned = 0
    key = c.dlq_key(stream)
    with translated():
        while wanted - found and scanned < scan_limit:
            rows: Any = await redis.xrange(key, min=start, max="+", count=1000) or []
            for _row_id, fields in rows:
                source = fields.get(b"id") if isinstance(fields, dict) else None
                if source is not None and text(source) in wanted:
                    found.add(text(source))
            scanned += len(rows)
            if len(rows) < 1000:
                break
            start = "(" + text(rows[-1][0])
    return found


async def ack(redis: aioredis.Redis, group: str, entries: Iterable[Entry]) -> None:
    """XACK ``entries`` (one command per stream; a vanished group is not an error)."""
    by_stream: dict[str, list[str]] = {}
    for entry in entries:
        by_stream.setdefault(entry.stream, []).append(entry.id)
    for stream, ids in by_stream.items():
        try:
            with translated():
                await redis.xack(stream, group, *ids)
        except ResponseError as exc:
            if not is_nogroup(exc):
                raise


async def settle(
    redis: aioredis.Redis,
    group: str,
    consumer: str,
    acks: Iterable[Entry],
    dead: Sequence[DeadLetter],
) -> list[tuple[DeadLetter, RedisUnavailable | RedisRefused]]:
    """Dead-letter, check each reply, then acknowledge only what is safe to.

    Two steps, never one pipeline whose errors are collected: the dead letters are
    written first and each reply checked; then ``acks`` and the entries whose dead
    letter Redis confirmed are acknowledged. Returns the dead letters that were
    refused: their entries are left pending (a crash in between also leaves an entry
    pending, redelivered, never lost).
    """
    refused = await write_dead_letters(redis, consumer, dead)
    not_written = {id(d) for d, _ in refused}
    await ack(redis, group, [*acks, *(d.entry for d in dead if id(d) not in not_written)])
    return refused


async def refresh_leases(
    redis: aioredis.Redis, stream: str, group: str, consumer: str, ids: Sequence[str]
) -> None:
    """``XCLAIM … 0 … JUSTID``: reset the idle time of entries this consumer holds
    (1,000 per command) without counting a delivery. A vanished group is ignored."""
    for i in range(0, len(ids), 1000):
        try:
            with translated():
                await redis.xclaim(stream, group, consumer, 0, list(ids[i : i + 1000]),
                                   justid=True)
        except ResponseError as exc:
            if not is_nogroup(exc):
                raise

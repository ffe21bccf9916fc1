"""The Redis edge: every stream command the worker sends, and the one place where
redis-py errors become the project's own.

Reading (XREADGROUP), claiming (XAUTOCLAIM, XCLAIM JUSTID), settling (dead letters,
XACK), group creation, stream IDs and the slot rule for a stream's keys live here.
redis-py errors are translated here, once (:func:`translate`, :func:`translated`):

* :class:`~worker.errors.RedisUnavailable` — back off and retry: unreachable, timed
  out, loading, out of memory, or a cluster failing over or moving a slot
  (CLUSTERDOWN, TRYAGAIN, MASTERDOWN, READONLY, MOVED/ASK left after redirects);
* :class:`~worker.errors.GroupMissing` — NOGROUP, or UNBLOCKED for a blocked read whose
  stream was deleted: create the group again;
* :class:`~worker.errors.StreamMissing` — ``no such key`` (XINFO on a missing stream);
* :class:`~worker.errors.RedisRefused` — this command will not succeed as sent.

The loops above never look at Redis error strings. Commands name one stream each:
on a cluster a stream and its dead-letter key share one slot (:func:`check_slots`),
so every command of a shard goes to the node that owns it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    MovedError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import constants as c
from .deadletter import DeadLetter
from .errors import (
    ConfigError,
    GroupMissing,
    RedisFailure,
    RedisRefused,
    RedisUnavailable,
    StreamMissing,
)


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


def dead_letter(entry: Entry, reason: str, error: str) -> DeadLetter:
    """The dead letter of ``entry``, to be written by :func:`settle`."""
    return DeadLetter(reason, error, entry.stream, entry.id, entry.deliveries, entry.payload,
                      sig=entry.sig, extra_events=entry.extra_payloads)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
    (SlotNotCoveredError, "cluster"),
    (ReadOnlyError, "readonly"),
    (ClusterError, "cluster"),
    (RedisClusterException, "cluster"),
)

#: Reply prefixes of other errors that pass on their own (redis-py keeps the prefix).
_UNAVAILABLE_PREFIXES = {
    "BUSY": "busy", "NOREPLICAS": "cluster", "OOM": "oom", "LOADING": "loading",
    "CLUSTERDOWN": "cluster", "TRYAGAIN": "cluster", "MASTERDOWN": "cluster",
    "READONLY": "readonly", "MOVED": "moved", "ASK": "moved",
}


def _closed_while_in_use(exc: BaseException) -> bool:
    """redis-py (8.1 and before) lets an ``AttributeError``/``TypeError`` out when it
    writes to a connection that is being closed, as when a cluster node dies
    (redis/redis-py#4287, #3546): a broken connection, raised from its connection
    module, never an error of the caller's."""
    if not isinstance(exc, (AttributeError, TypeError)) or "NoneType" not in str(exc):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith(
                "/redis/asyncio/connection.py"):
            return True
        tb = tb.tb_next
    return False


def translate(exc: BaseException) -> RedisFailure | None:
    """The project's error for a redis-py error, or None for an exception that is not
    Redis's (and for BUSYGROUP, which :func:`ensure_group` reads as "exists")."""
    if isinstance(exc, RedisFailure):
        return exc
    for cls, kind in _UNAVAILABLE_CLASSES:
        if isinstance(exc, cls):
            return RedisUnavailable(kind, str(exc))
    if _closed_while_in_use(exc):
        return RedisUnavailable("connection", f"connection closed while in use: {exc}")
    if not isinstance(exc, RedisError):
        return None
    message = str(exc)
    head = message.split(" ", 1)[0]
    if head in ("NOGROUP", "UNBLOCKED"):
        return GroupMissing("nogroup", message)
    if head in _UNAVAILABLE_PREFIXES:
        return RedisUnavailable(_UNAVAILABLE_PREFIXES[head], message)
    if isinstance(exc, ResponseError):
        if head == "BUSYGROUP":
            return None
        if head in ("NOAUTH", "WRONGPASS", "NOPERM"):
            return RedisRefused("auth", message)
        if "no such key" in message.lower():
            return StreamMissing("nogroup", message)
        return RedisRefused("wrongtype" if head == "WRONGTYPE" else "refused", message)
    return RedisUnavailable("other", message)


@contextmanager
def translated() -> Iterator[None]:
    """Raise redis-py errors raised inside as the project's own (see :func:`translate`)."""
    try:
        yield
    except (RedisError, OSError, AttributeError, TypeError) as exc:
        mapped = translate(exc)
        if mapped is None:
            raise
        raise mapped from exc


def check(result: object) -> None:
    """Raise the (translated) error a pipeline returned with ``raise_on_error=False``."""
    if isinstance(result, BaseException):
        raise (translate(result) or result) from result


# -- stream IDs and keys ---------------------------------------------------------------


def parse_id(entry_id: str) -> tuple[int, int]:
    """``"1700000000000-3"`` → ``(1700000000000, 3)``; a bare ``ms`` means ``ms-0``."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def id_ms(entry_id: str) -> int:
    """Milliseconds since the epoch encoded in a stream entry ID."""
    return parse_id(entry_id)[0]


def stream_keys(stream: str) -> tuple[str, ...]:
    """Every key that belongs to ``stream``: the stream and its dead-letter stream."""
    return (stream, c.dlq_key(stream))


def check_slots(streams: Sequence[str]) -> None:
    """Refuse streams whose own keys would land in different cluster slots.

    A stream's dead-letter XADD and its XACK must reach the same node, so the
    dead-letter key has to hash to the stream's slot: give sharded streams a hash tag
    (``audit:events:{0}`` → ``audit:events:{0}:dlq``).
    """
    for stream in streams:
        slot = key_slot(stream.encode())
        for key in stream_keys(stream)[1:]:
            other = key_slot(key.encode())
            if other != slot:
                raise ConfigError(
                    f"AUDIT_STREAM {stream!r} is in cluster slot {slot} but its key {key!r} "
                    f"is in slot {other}: put a hash tag in the stream name "
                    f"(e.g. 'audit:events:{{0}}')"
                )


# -- reading ---------------------------------------------------------------------------


class EntryFields(dict[Any, Any]):
    """An entry's fields as redis-py hands them out (a dict), with every raw
    ``field, value`` pair kept in :attr:`pairs`: a field repeated in one entry (two
    ``event`` fields) is seen instead of the last one silently winning."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: Sequence[Any]) -> None:
        super().__init__(zip(pairs[::2], pairs[1::2], strict=False))
        self.pairs = pairs


def _stream_entries(entries: Any) -> list[tuple[Any, EntryFields | None]]:
    return [(item[0], None if item[1] is None else EntryFields(item[1]))
            for item in entries or () if item is not None]


def parse_read_reply(response: Any, **_options: Any) -> Any:
    """The XREADGROUP response callback this edge registers with redis-py: redis-py's own
    shapes (RESP2 ``[[stream, [(id, fields)…]]…]``, RESP3 ``{stream: [[(id, fields)…]]}``),
    with :class:`EntryFields` as the fields."""
    if response is None:
        return []
    if isinstance(response, dict):
        return {key: [_stream_entries(value)] for key, value in response.items()}
    return [[item[0], _stream_entries(item[1])] for item in response]


def parse_autoclaim_reply(response: Any, **options: Any) -> Any:
    """The XAUTOCLAIM response callback this edge registers with redis-py: redis-py's own
    shape (``[cursor, [(id, fields)…], deleted…]``, the same on RESP2 and RESP3), with
    :class:`EntryFields` as the fields, so a repeated ``event`` field survives a reclaim
    as it survives a read. ``JUSTID`` replies are the list of IDs, as redis-py returns."""
    if options.get("parse_justid", False):
        return response[1]
    cursor, entries, *rest = response
    return [cursor, _stream_entries(entries), *rest]


_PARSERS = {"XREADGROUP": parse_read_reply, "XAUTOCLAIM": parse_autoclaim_reply}


def install_read_parser(redis: aioredis.Redis) -> None:
    """Register :func:`parse_read_reply` for XREADGROUP and :func:`parse_autoclaim_reply`
    for XAUTOCLAIM on ``redis`` (idempotent)."""
    for command, parser in _PARSERS.items():
        if redis.response_callbacks.get(command) is not parser:
            redis.set_response_callback(command, parser)


async def read_group(
    redis: aioredis.Redis,
    group: str,
    consumer: str,
    stream: str,
    count: int,
    block_ms: int | None,
) -> list[Entry]:
    """``XREADGROUP GROUP g c COUNT n [BLOCK ms] STREAMS s >``: new entries of one stream.

    Sent through redis-py's ``xreadgroup`` (a cluster client routes it to the node that
    owns ``stream``) and parsed by the registered :func:`parse_read_reply`.
    """
    install_read_parser(redis)
    with translated():
        reply = await redis.xreadgroup(group, consumer, {stream: ">"}, count=count,
                                       block=block_ms)
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
            pairs = fields.pairs if type(fields) is EntryFields else fields
            if (type(pairs) is list and len(pairs) == 2 and pairs[0] == _EVENT_KEYS[0]
                    and type(pairs[1]) is bytes and type(entry_id) is bytes):
                out.append(Entry(name, entry_id.decode(), pairs[1]))  # just the event field
                continue
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
    if isinstance(fields, EntryFields):
        fields = fields.pairs
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
    except ResponseError as exc:
        if str(exc).startswith("BUSYGROUP"):
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
    except StreamMissing:
        return False
    return any(text(g["name"]) == group for g in groups)


async def group_drained(redis: aioredis.Redis, stream: str, group: str) -> bool:
    """True when ``group`` has no pending and no undelivered entries on ``stream``
    (a missing stream counts as drained, a missing group does not)."""
    try:
        with translated():
            groups = await redis.xinfo_groups(stream)
    except StreamMissing:
        return True
    mine = next((g for g in groups if text(g["name"]) == group), None)
    if mine is None:
        return False
    if int(mine["pending"]):
        return False
    lag = mine.get("lag")
    if lag is not None and int(lag) == 0:
        return True
    with translated():
        info = await redis.xinfo_stream(stream)
    last_delivered = parse_id(text(mine["last-delivered-id"]))
    return int(info["length"]) == 0 or last_delivered >= parse_id(text(info["last-generated-id"]))


# -- claiming --------------------------------------------------------------------------


async def autoclaim(
    redis: aioredis.Redis, stream: str, group: str, consumer: str, min_idle_ms: int,
    cursor: str, count: int,
) -> tuple[str, list[Entry], list[str]]:
    """One XAUTOCLAIM call: the next cursor, the claimed entries with their delivery
    counts, and the IDs of pending entries that no longer exist in the stream.

    Parsed by the registered :func:`parse_autoclaim_reply`: an entry's raw field pairs
    are kept, so two ``event`` fields are seen (and dead-lettered as ambiguous)."""
    install_read_parser(redis)
    with translated():
        reply: Any = await redis.xautoclaim(stream, group, consumer, min_idle_ms, cursor,
                                            count=count)
    next_cursor = text(reply[0])
    raw = reply[1] or []
    deleted = [text(i) for i in reply[2]] if len(reply) > 2 and reply[2] else []
    live = [(i, f) for i, f in raw if f is not None]
    deleted.extend(text(i) for i, f in raw if f is None)  # Redis 6.2 reports them as nil
    entries = entries_from_read([(stream, live)]) if live else []
    if entries:
        counts = await delivery_counts(redis, stream, group, consumer, entries)
        for entry in entries:
            entry.deliveries = counts.get(entry.id, 1)
    return next_cursor, entries, deleted


async def delivery_counts(
    redis: aioredis.Redis, stream: str, group: str, consumer: str, entries: Sequence[Entry]
) -> dict[str, int]:
    """Delivery counts of entries ``consumer`` owns (one XPENDING range)."""
    with translated():
        rows = await redis.xpending_range(
            stream, group, min=entries[0].id, max=entries[-1].id,
            count=len(entries) + 1000, consumername=consumer,
        )
    return {text(r["message_id"]): int(r["times_delivered"]) for r in rows}


# -- settling --------------------------------------------------------------------------


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
                pipe.xadd(c.dlq_key(d.stream), d.fields(consumer, int(time.time() * 1000)))
            results = await pipe.execute(raise_on_error=False)
    refused: list[tuple[DeadLetter, RedisUnavailable | RedisRefused]] = []
    for d, result in zip(dead, results, strict=True):
        if isinstance(result, BaseException):
            mapped = translate(result)
            error = (mapped if isinstance(mapped, RedisUnavailable | RedisRefused)
                     else RedisRefused("refused", str(result)))
            refused.append((d, error))
    return refused


async def dead_lettered_ids(
    redis: aioredis.Redis, stream: str, ids: Sequence[str], scan_limit: int = 10_000
) -> set[str]:
    """Entry IDs among ``ids`` (all of ``stream``) that already have a dead letter.

    A dead letter is written after its entry was appended, so the search starts at the
    oldest entry's time and reads at most ``scan_limit`` dead letters (a bound, not a
    guarantee, on a huge dead-letter stream). Used before dead-lettering an entry that
    was delivered before: a worker may have died between the XADD and the XACK.
    """
    wanted = set(ids)
    found: set[str] = set()
    start: str = f"{min(id_ms(i) for i in ids)}-0"
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


async def ack(
    redis: aioredis.Redis, group: str, entries: Iterable[Entry], dead: Iterable[DeadLetter] = ()
) -> None:
    """XACK ``entries`` and the entries of ``dead`` (one command per stream; a vanished
    group is not an error)."""
    by_stream: dict[str, list[str]] = {}
    for entry in entries:
        by_stream.setdefault(entry.stream, []).append(entry.id)
    for d in dead:
        by_stream.setdefault(d.stream, []).append(d.source_id)
    for stream, ids in by_stream.items():
        try:
            with translated():
                await redis.xack(stream, group, *ids)
        except GroupMissing:
            pass


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
    await ack(redis, group, acks, [d for d in dead if id(d) not in not_written])
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
        except GroupMissing:
            return

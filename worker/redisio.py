"""Small Redis helpers shared by the worker loops: groups, entries, dead letters, ACKs."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from . import constants as c


@dataclass(slots=True)
class Entry:
    """One stream entry held by this worker until it is acknowledged."""

    stream: str
    id: str
    payload: bytes | None
    deliveries: int = 1
    #: Further ``event`` fields of the same entry (an ambiguous entry, dead-lettered whole).
    extra_payloads: tuple[bytes, ...] = ()

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
            out.append(Entry(name, text(entry_id), payload, extra_payloads=tuple(extra)))
    return out


_EVENT_KEYS = (c.EVENT_FIELD.encode(), c.EVENT_FIELD)


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


async def ensure_group(redis: aioredis.Redis, stream: str, group: str) -> bool:
    """Create the group from ID 0 (entries added before it are not skipped).

    Returns True if it was created, False if it existed.
    """
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    return True


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
    } | {f"{c.EVENT_FIELD}_{n}": extra for n, extra in enumerate(dead.entry.extra_payloads, 2)}


async def settle(
    redis: aioredis.Redis,
    group: str,
    consumer: str,
    acks: Iterable[Entry],
    dead: Sequence[DeadLetter],
) -> None:
    """Dead-letter, then acknowledge, in one pipelined round trip.

    XADD to the dead-letter stream comes before the XACK of the same entry, so a
    crash in between leaves the entry pending (redelivered), never lost.
    """
    by_stream: dict[str, list[str]] = {}
    for entry in acks:
        by_stream.setdefault(entry.stream, []).append(entry.id)
    for d in dead:
        by_stream.setdefault(d.entry.stream, []).append(d.entry.id)
    if not by_stream:
        return
    if not dead and len(by_stream) == 1:
        # The common case, one XACK: sent on its own, without a pipeline's set-up.
        ((stream, ids),) = by_stream.items()
        try:
            await redis.xack(stream, group, *ids)
        except ResponseError as exc:
            if not is_nogroup(exc):
                raise
        return
    async with redis.pipeline(transaction=False) as pipe:
        for d in dead:
            pipe.xadd(c.dlq_key(d.entry.stream), dead_letter_fields(d, consumer))
        for stream, ids in by_stream.items():
            pipe.xack(stream, group, *ids)
        results = await pipe.execute(raise_on_error=False)
    for result in results:
        if isinstance(result, Exception) and not is_nogroup(result):
            raise result

"""The producer SDK: emit audit events to Redis Streams from a workflow engine.

>>> emitter = AuditEmitter.from_url("redis://localhost:6379/0")
>>> async with RunRecorder(emitter, "workspace_abc", "wf_lead_triage",
...                        trigger={"type": "webhook", "source": "gmail"}) as run:
...     run.record_node({"nodeId": "classify", "type": "ai", ...})

Events are validated against the v1 contract before ``XADD``, so a producer bug
fails in the producer, not in the fleet. With several streams (shards) a run's events
all go to ``streams[crc32(runId) % len(streams)]`` (docs/events.md, "Sharding"), on a
standalone Redis and on a cluster alike. Streams are never trimmed here (no
``MAXLEN``): trimming is the fleet's job, below what every group acknowledged.

Given a keyring (``keyring=Keyring.load(path)``), every entry is signed with the
workspace's active key (the last key id listed for it): the ``sig`` field of
``worker.signing``.
"""

from __future__ import annotations

import secrets
import time
import uuid
import zlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis

from . import constants as c
from . import events as ev
from . import redisclient
from .constants import Reason
from .errors import InvalidEvent, NotReplicated
from .settings import Settings
from .signing import Keyring, sign


def uuid7(ms: int, random_bits: int) -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48 bits of milliseconds since the epoch, then 74 random bits."""
    rand_a, rand_b = (random_bits >> 62) & 0xFFF, random_bits & ((1 << 62) - 1)
    return uuid.UUID(int=(ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64
                     | 0b10 << 62 | rand_b)


def shard_index(run_id: str, shards: int) -> int:
    """The shard of a run: CRC-32 (IEEE 802.3, as zlib) of the UTF-8 ``runId``, modulo
    the number of streams. ``shard_index("run_42", 8) == 4`` (docs/events.md)."""
    if shards <= 1:
        return 0
    return zlib.crc32(run_id.encode()) % shards


def new_event_id() -> str:
    """A fresh, unique, time-ordered event ID (the idempotency key): a UUIDv7 in hex, so of
    two versions of one node execution the later one has the greater ID (docs/events.md)."""
    return uuid7(time.time_ns() // 1_000_000, secrets.randbits(74)).hex


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _iso(value: Any) -> Any:
    if not isinstance(value, datetime):
        return value
    try:
        return value.astimezone(UTC).isoformat()
    except OverflowError:  # e.g. datetime.min in a zone east of UTC
        raise InvalidEvent(Reason.SCHEMA, f"time out of range: {value!r} is outside "
                                          "years 0001-9999 in UTC") from None


def make_event(
    type: str, workspace_id: str, workflow_id: str, run_id: str, **fields: Any
) -> dict[str, Any]:
    """A v1 event with ``v``, ``eventId`` and ``ts`` filled in (datetimes become RFC 3339)."""
    event: dict[str, Any] = {
        "v": c.SCHEMA_VERSION,
        "eventId": fields.pop("eventId", None) or new_event_id(),
        "type": type,
        "workspaceId": workspace_id,
        "workflowId": workflow_id,
        "runId": run_id,
        "ts": _iso(fields.pop("ts", None)) or now_iso(),
    }
    for key, value in fields.items():
        if value is not None:
            event[key] = _iso(value)
    return event


class AuditEmitter:
    """Validates events and appends them to the audit stream(s)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        streams: Sequence[str] = (c.DEFAULT_STREAM,),
        *,
        max_event_bytes: int = c.DEFAULT_MAX_EVENT_BYTES,
        validate: bool = True,
        keyring: Keyring | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
    ) -> None:
        if not streams:
            raise ValueError("at least one stream is required")
        self.redis = redis
        self.streams = tuple(streams)
        self.max_event_bytes = max_event_bytes
        self.validate = validate
        self.keyring = keyring
        #: After XADD, ``WAIT wait_replicas wait_timeout_ms`` (AUDIT_EMIT_WAIT_REPLICAS).
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms

    @classmethod
    def from_url(
        cls, url: str = c.DEFAULT_REDIS_URL, *, mode: str = "standalone", **kwargs: Any
    ) -> AuditEmitter:
        """An emitter on a client for ``mode`` (standalone, cluster or sentinel)."""
        return cls(redisclient.client(url, mode), **kwargs)

    @classmethod
    async def connect(
        cls, url: str = c.DEFAULT_REDIS_URL, *, mode: str = "auto", **kwargs: Any
    ) -> AuditEmitter:
        """An emitter on :func:`worker.redisclient.connect` (``auto`` asks the server)."""
        streams = tuple(kwargs.get("streams", (c.DEFAULT_STREAM,)))
        return cls(await redisclient.connect(url, mode, streams=streams), **kwargs)

    @classmethod
    async def from_settings(cls, settings: Settings, **kwargs: Any) -> AuditEmitter:
        """An emitter configured like the fleet (AUDIT_REDIS_*, AUDIT_STREAM,
        AUDIT_EMIT_WAIT_REPLICAS, AUDIT_EMIT_WAIT_TIMEOUT_MS)."""
        return cls(await redisclient.connect_settings(settings), settings.streams,
                   max_event_bytes=settings.max_event_bytes,
                   wait_replicas=settings.emit_wait_replicas,
                   wait_timeout_ms=settings.emit_wait_timeout_ms, **kwargs)

    async def aclose(self) -> None:
        await self.redis.aclose()

    def stream_for(self, run_id: str) -> str:
        """The stream a run's events go to: stable, so one run stays in one shard."""
        return self.streams[shard_index(run_id, len(self.streams))]

    def encode(self, event: Mapping[str, Any]) -> bytes:
        """Encode (and validate) one event; raises :class:`worker.errors.InvalidEvent`."""
        payload = ev.encode(dict(event))
        if self.validate:
            ev.decode(payload, max_bytes=self.max_event_bytes)
        return payload

    def fields(self, event: Mapping[str, Any]) -> dict[Any, Any]:
        """The stream entry of one event: ``event``, and ``sig`` when signing."""
        payload = self.encode(event)
        if self.keyring is None:
            return {c.EVENT_FIELD: payload}
        key_id, secret = self.keyring.active_key(str(event["workspaceId"]))
        return {c.EVENT_FIELD: payload, c.SIG_FIELD: sign(payload, key_id, secret)}

    async def emit(self, event: Mapping[str, Any]) -> str:
        """Append one event; returns its stream entry ID."""
        if self.wait_replicas > 0:
            return (await self.emit_many([event]))[0]
        entry_id = await self.redis.xadd(self.stream_for(event["runId"]), self.fields(event))
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def emit_many(self, events: Iterable[Mapping[str, Any]]) -> list[str]:
        """Append many events in one pipelined round trip; all are validated first.

        With ``wait_replicas``, ``WAIT n timeout`` goes in the same pipeline, after the
        appends to its node, so it runs on the connection that sent them: Redis's WAIT
        counts the replicas that have the *calling connection's* last write, and on
        another connection of the pool it could confirm without these entries.
        Raises :class:`worker.errors.NotReplicated` when fewer replicas than asked
        acknowledged in time: the entries are appended (re-emitting them is safe,
        the fleet deduplicates by ``eventId``), but not yet on enough replicas.
        """
        encoded = [(self.stream_for(e["runId"]), self.fields(e)) for e in events]
        if not encoded:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, fields in encoded:
                pipe.xadd(stream, fields)
            if self.wait_replicas > 0:
                self._queue_wait(pipe, sorted({stream for stream, _ in encoded}))
            replies = await pipe.execute()
        ids, counts = replies[: len(encoded)], replies[len(encoded):]
        if counts:
            acked = min(int(x) for x in counts)
            if acked < self.wait_replicas:
                raise NotReplicated(acked, self.wait_replicas, self.wait_timeout_ms)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    def _queue_wait(self, pipe: Any, streams: Sequence[str]) -> None:
        """``WAIT`` once per node written (on a cluster each shard's master is asked)."""
        args = ("WAIT", self.wait_replicas, self.wait_timeout_ms)
        if not redisclient.is_cluster(self.redis):
            pipe.execute_command(*args)
            return
        nodes = {}
        for stream in streams:
            node = self.redis.get_node_from_key(stream)  # type: ignore[attr-defined]
            nodes[node.name] = node
        for node in nodes.values():
            pipe.execute_command(*args, target_nodes=node)

    async def emit_raw(self, stream: str, payload: bytes, sig: bytes | None = None) -> str:
        """Append a payload as is, without validation (tests, replays of dead letters)."""
        fields: dict[Any, Any] = {c.EVENT_FIELD: payload}
        if sig is not None:
            fields[c.SIG_FIELD] = sig
        entry_id = await self.redis.xadd(stream, fields)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


class RunRecorder:
    """Buffers one run's node results and flushes them when the run ends.

    ``mode="snapshot"`` (the default) writes the whole run as one ``run.snapshot``
    event: the design's "buffer the nodes, write the run once" pattern.
    ``mode="events"`` emits ``run.started``, one event per node and the terminal
    event, pipelined at flush. Used as an async context manager, an exception
    inside the block ends the run as failed (and is re-raised).
    """

    def __init__(
        self,
        emitter: AuditEmitter,
        workspace_id: str,
        workflow_id: str,
        run_id: str | None = None,
        *,
        trigger: Mapping[str, Any] | None = None,
        mode: str = "snapshot",
        **extra: Any,
    ) -> None:
        if mode not in ("snapshot", "events"):
            raise ValueError("mode must be 'snapshot' or 'events'")
        self.emitter = emitter
        self.workspace_id = workspace_id
        self.workflow_id = workflow_id
        self.run_id = run_id or f"run_{uuid.uuid4().hex[:16]}"
        self.trigger = dict(trigger) if trigger else None
        self.mode = mode
        self.extra = extra
        self.started_at = datetime.now(UTC)
        self.nodes: list[dict[str, Any]] = []
        self.flushed = False

    def record_node(self, node: Mapping[str, Any] | None = None, **fields: Any) -> None:
        """Buffer one node execution (``nodeId`` and ``type`` required)."""
        data = {**(node or {}), **fields}
        data.setdefault("completedAt", datetime.now(UTC))
        self.nodes.append({k: _iso(v) for k, v in data.items() if v is not None})

    def events(
        self, status: str = "completed", error: Any = None, completed_at: datetime | None = None
    ) -> list[dict[str, Any]]:
        """The events this run flushes as."""
        done = completed_at or datetime.now(UTC)
        duration = round((done - self.started_at).total_seconds() * 1000, 3)
        ids = (self.workspace_id, self.workflow_id, self.run_id)
        if self.mode == "snapshot":
            return [make_event(
                "run.snapshot", *ids, trigger=self.trigger, status=status,
                startedAt=self.started_at, completedAt=done, totalDuration=duration,
                error=error, nodes=self.nodes, **self.extra,
            )]
        out = [make_event("run.started", *ids, trigger=self.trigger, startedAt=self.started_at,
                          ts=self.started_at, **self.extra)]
        for node in self.nodes:
            kind = "node.failed" if node.get("error") else "node.completed"
            out.append(make_event(kind, *ids, node=node, ts=node.get("completedAt")))
        terminal = "run.completed" if status == "completed" else "run.failed"
        out.append(make_event(terminal, *ids, status=status, totalDuration=duration,
                              error=error, completedAt=done, ts=done))
        return out

    async def flush(self, status: str = "completed", error: Any = None) -> list[str]:
        """Emit the run (once); returns the stream entry IDs."""
        if self.flushed:
            return []
        ids = await self.emitter.emit_many(self.events(status, error))
        self.flushed = True
        return ids

    async def __aenter__(self) -> RunRecorder:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.flush()
        elif isinstance(exc, Exception):
            await self.flush("failed", {"type": type(exc).__name__, "message": str(exc)[:2000]})

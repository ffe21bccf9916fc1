"""The dead-letter record: one type for what is written, what is on the wire and what
is read back.

The worker builds a :class:`DeadLetter` for an entry it can never store
(:func:`worker.redisio.dead_letter`), the Redis edge XADDs its :meth:`~DeadLetter.fields`
to ``<stream>:dlq`` (``constants.DLQ_FIELDS``: reason, error, stream, id, deliveries,
event, consumer, ts, and ``sig`` / ``event_2``, ``event_3``, … when the entry had them),
and ``audit-fleet dlq`` reads it back with :meth:`DeadLetter.from_fields`. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from . import constants as c
from .queries import format_time

#: The wire keeps at most this many characters of the error.
_ERROR_CHARS = 2000


class _WorkspaceOnly(msgspec.Struct):
    workspaceId: Any = None


_workspace_decoder = msgspec.json.Decoder(_WorkspaceOnly)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter: the entry it keeps, why it was dead-lettered, and, once read
    back, where it is stored (``dlq`` and its own ``id`` there)."""

    reason: str
    error: str
    #: The source stream and the entry's ID in it (the wire's ``stream`` and ``id``).
    stream: str
    source_id: str
    deliveries: int | None
    #: The original payload bytes (None: read back without an ``event`` field).
    event: bytes | None
    #: The entry's ``sig`` field (signed events), replayed with the event.
    sig: bytes | None = None
    #: Further ``event`` fields of an ambiguous entry (written as ``event_2``, …; not
    #: read back).
    extra_events: tuple[bytes, ...] = ()
    #: Set when written (:meth:`fields`) and read back.
    consumer: str = ""
    ts_ms: int | None = None
    #: Where it is stored; empty until it is read back.
    dlq: str = ""
    id: str = ""

    def fields(self, consumer: str, ts_ms: int) -> dict[Any, Any]:
        """The fields XADDed to ``<stream>:dlq`` by ``consumer`` at ``ts_ms``."""
        out: dict[Any, Any] = {
            "reason": self.reason,
            "error": self.error[:_ERROR_CHARS],
            "stream": self.stream,
            "id": self.source_id,
            "deliveries": self.deliveries,
            "event": self.event if self.event is not None else b"",
            "consumer": consumer,
            "ts": ts_ms,
        }
        if self.sig is not None:
            out[c.SIG_FIELD] = self.sig
        for n, extra in enumerate(self.extra_events, 2):
            out[f"{c.EVENT_FIELD}_{n}"] = extra
        return out

    @classmethod
    def from_fields(cls, dlq: str, entry_id: Any, fields: Any) -> DeadLetter:
        """A dead letter from XRANGE's ``(id, fields)`` of ``dlq``; missing fields become
        empty (None for deliveries, ts and event)."""
        event = _field(fields, "event")
        sig = _field(fields, c.SIG_FIELD)
        return cls(
            dlq=dlq,
            id=_text(entry_id),
            reason=_text(_field(fields, "reason") or ""),
            error=_text(_field(fields, "error") or ""),
            stream=_text(_field(fields, "stream") or ""),
            source_id=_text(_field(fields, "id") or ""),
            deliveries=_int_or_none(_field(fields, "deliveries")),
            consumer=_text(_field(fields, "consumer") or ""),
            ts_ms=_int_or_none(_field(fields, "ts")),
            event=event.encode() if isinstance(event, str) else event,
            sig=sig.encode() if isinstance(sig, str) else sig,
        )

    @property
    def source_stream(self) -> str:
        """The stream this dead-letter stream belongs to (where replay sends the event)."""
        return self.dlq[: -len(c.DLQ_SUFFIX)]

    @property
    def dead_lettered_ms(self) -> int:
        """When it was dead-lettered, by Redis's clock (the time in its dead-letter ID)."""
        return int(self.id.partition("-")[0])

    @property
    def workspace(self) -> str | None:
        """The event's ``workspaceId``, or None when the payload is not a JSON object with one."""
        if not self.event:
            return None
        try:
            value = _workspace_decoder.decode(self.event).workspaceId
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        return value if isinstance(value, str) else None

    def to_dict(self, *, with_event: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dlq": self.dlq,
            "id": self.id,
            "dead_lettered_at": _iso(self.dead_lettered_ms),
            "ts_ms": self.ts_ms,
            "reason": self.reason,
            "error": self.error,
            "stream": self.stream,
            "source_id": self.source_id,
            "deliveries": self.deliveries,
            "consumer": self.consumer,
            "workspace": self.workspace,
            "event_bytes": len(self.event) if self.event is not None else None,
        }
        if with_event:
            out["event"], out["event_encoding"] = _event_text(self.event)
        return out


def _iso(ms: int) -> str:
    return format_time(datetime.fromtimestamp(ms / 1000, tz=UTC))


def _event_text(event: bytes | None) -> tuple[str | None, str | None]:
    if event is None:
        return None, None
    try:
        return event.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        import base64

        return base64.b64encode(event).decode(), "base64"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field(fields: dict[Any, Any], name: str) -> Any:
    value = fields.get(name.encode())
    return fields.get(name) if value is None else value


def _int_or_none(value: Any) -> int | None:
    try:
        return int(_text(value)) if value is not None else None
    except ValueError:
        return None

"""The dead-letter record: the fields written to ``<stream>:dlq`` and read back."""

from __future__ import annotations

from worker import constants as c
from worker.deadletter import DeadLetter
from worker.redisio import Entry, dead_letter


def _as_redis_returns(fields: dict[str, object]) -> dict[bytes, bytes]:
    """What XRANGE gives back for XADDed fields (no decode_responses): bytes both sides."""
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode()
            for k, v in fields.items()}


def test_written_fields_are_the_documented_ones() -> None:
    """A dead letter is XADDed with constants.DLQ_FIELDS, plus sig and event_2… when the
    entry had them; the error is cut to 2,000 characters, a missing payload is empty."""
    signed = Entry("s", "5-1", b'{"a":1}', deliveries=3, extra_payloads=(b"x", b"y"),
                   sig=b"v1.k.sig")
    fields = dead_letter(signed, c.Reason.DUPLICATE_FIELD, "e" * 3000).fields("w1", 1234)
    assert list(fields) == [*c.DLQ_FIELDS, c.SIG_FIELD, "event_2", "event_3"]
    assert fields["error"] == "e" * 2000
    assert (fields["stream"], fields["id"], fields["deliveries"]) == ("s", "5-1", 3)
    assert (fields["consumer"], fields["ts"], fields["event_3"]) == ("w1", 1234, b"y")
    plain = dead_letter(Entry("s", "6-0", None), c.Reason.MISSING_FIELD, "none").fields("w", 1)
    assert list(plain) == list(c.DLQ_FIELDS)
    assert plain["event"] == b""


def test_read_back_gives_the_written_record() -> None:
    """What is written is what ``dlq`` reads back, with where it is stored."""
    written = dead_letter(Entry("s", "5-1", b'{"workspaceId":"w"}', deliveries=2, sig=b"k"),
                          c.Reason.INVALID_JSON, "bad")
    back = DeadLetter.from_fields("s:dlq", b"7-0", _as_redis_returns(written.fields("w1", 99)))
    assert back == DeadLetter(written.reason, written.error, "s", "5-1", 2, written.event,
                              sig=b"k", consumer="w1", ts_ms=99, dlq="s:dlq", id="7-0")
    assert (back.source_stream, back.dead_lettered_ms, back.workspace) == ("s", 7, "w")


def test_missing_or_bad_fields_read_back_empty() -> None:
    """A dead letter without fields (or with a bad number) still reads back."""
    back = DeadLetter.from_fields("s:dlq", "8-0", {b"deliveries": b"many"})
    assert (back.reason, back.source_id, back.deliveries, back.ts_ms, back.event) == \
        ("", "", None, None, None)

"""The one output module: tables, times, durations, escaping."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from worker.cli.output import (
    JsonStream,
    escape_text,
    format_time,
    parse_duration,
    parse_when,
    print_json,
    table,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_table_formats_cells_and_aligns_numbers() -> None:
    """None is a dash, datetimes are RFC 3339 UTC, numeric columns are right-aligned."""
    out = table(["WHEN", "N", "NAME"],
                [[datetime(2026, 2, 15, 10, 30, tzinfo=UTC), 7, None],
                 [None, 1234, "x"]])
    assert out.splitlines() == [
        "WHEN                            N  NAME",
        "2026-02-15T10:30:00.000000Z     7  -",
        "-                            1234  x",
    ]


def test_table_escapes_event_data() -> None:
    """A cell cannot carry an ANSI escape or a line break into the terminal."""
    out = table(["NAME"], [["evil\x1b[2J\nline"]])
    assert out.splitlines() == ["NAME", "evil\\x1b[2J\\x0aline"]


def test_escape_text() -> None:
    assert escape_text("plain ünïcode") == "plain ünïcode"
    assert escape_text("a\x1b[31mred\x07") == "a\\x1b[31mred\\x07"
    assert escape_text("rtl\u202eoverride\u2028sep") == "rtl\\u202eoverride\\u2028sep"
    assert escape_text("two\nlines\tand\r", keep_newlines=True) == "two\nlines\tand\\x0d"


def test_one_time_format_with_four_digit_years() -> None:
    assert format_time(datetime(33, 1, 2, 3, 4, 5, 6, tzinfo=UTC)) == \
        "0033-01-02T03:04:05.000006Z"
    assert format_time(datetime(2026, 2, 15, 11, 30)) == "2026-02-15T11:30:00.000000Z"


def test_parse_when_forms() -> None:
    """Durations back from now, RFC 3339 times (UTC when naive), dates, epoch ms."""
    assert parse_when("90s", NOW) == NOW - timedelta(seconds=90)
    assert parse_when("1.5h", NOW) == NOW - timedelta(minutes=90)
    assert parse_when("2w", NOW) == NOW - timedelta(days=14)
    assert parse_when("2026-02-15T11:30:00+01:00", NOW) == datetime(2026, 2, 15, 10, 30,
                                                                   tzinfo=UTC)
    assert parse_when("2026-02-15T10:30:00", NOW) == datetime(2026, 2, 15, 10, 30, tzinfo=UTC)
    assert parse_when("2026-02-15", NOW) == datetime(2026, 2, 15, tzinfo=UTC)
    assert parse_when("1771151400000", NOW) == datetime(2026, 2, 15, 10, 30, tzinfo=UTC)
    assert parse_when(None, NOW) is None
    assert parse_when("", NOW) is None
    with pytest.raises(ValueError, match="not a time"):
        parse_when("yesterday", NOW)
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("7 days")


def test_a_streamed_json_document_is_the_printed_one(capsys: pytest.CaptureFixture[str]) -> None:
    """JsonStream prints, item by item, the same JSON value print_json prints whole, with
    event data escaped the same way; an empty stream closes cleanly."""
    items = [{"id": "1-0", "workspace": "a\x1b[31m", "n": [1, 2]}, {"id": "2-0"}]
    out = JsonStream({"version": 1, "dry_run": True}, "entries")
    for item in items:
        out.add(item)
    out.close({"count": 2})
    streamed = capsys.readouterr().out
    print_json({"version": 1, "dry_run": True, "entries": items, "count": 2})
    whole = capsys.readouterr().out
    assert json.loads(streamed) == json.loads(whole)
    assert "\x1b" not in streamed
    out = JsonStream({}, "replayed", "{")
    out.add("9-0", "1-0")
    out.close({"failed": {}})
    assert json.loads(capsys.readouterr().out) == {"replayed": {"1-0": "9-0"}, "failed": {}}
    JsonStream({}, "entries").close({})
    assert json.loads(capsys.readouterr().out) == {"entries": []}

"""`audit-fleet status` against real Redis: the terminal table and the stable JSON."""

from __future__ import annotations

import argparse
import json

import pytest
import redis.asyncio as aioredis

from tests.helpers import as_text, free_port
from worker import constants as c
from worker.cli import status as status_cli
from worker.cli.output import human_duration
from worker.cli.output import table as format_table
from worker.cli.status import render
from worker.fleet import fleet_status


def test_human_duration() -> None:
    """Durations read naturally at every scale; None is a dash."""
    assert human_duration(None) == "-"
    assert human_duration(0.35) == "350ms"
    assert human_duration(4.25) == "4.2s"
    assert human_duration(75) == "1m15s"
    assert human_duration(3 * 3600 + 5 * 60) == "3h05m"
    assert human_duration(93784) == "1d2h"


def test_format_table_aligns_columns() -> None:
    """Text columns are left-aligned, numeric ones right-aligned, all padded to the widest."""
    table = format_table(["NAME", "COUNT"], [["a", "5"], ["longer", "1234"], ["b", "-"]])
    assert table.splitlines() == [
        "NAME    COUNT",
        "a           5",
        "longer   1234",
        "b           -",
    ]


async def _fleet(redis: aioredis.Redis, stream: str) -> list[str]:
    ids = [as_text(await redis.xadd(stream, {c.EVENT_FIELD: b"{}"})) for _ in range(8)]
    await redis.xgroup_create(stream, "audit-writers", id="0")
    await redis.xgroup_create(stream, "archiver", id="$")
    await redis.xreadgroup("audit-writers", "host-a-1", {stream: ">"}, count=3)
    await redis.xreadgroup("audit-writers", "host-b-7", {stream: ">"}, count=2)
    await redis.xack(stream, "audit-writers", ids[0])
    await redis.xadd(c.dlq_key(stream), {"reason": "schema_violation", "event": b"{}"})
    return ids


@pytest.mark.redis
@pytest.mark.anyio
async def test_render_shows_streams_groups_and_consumers(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """The table has one row per stream, per group and per consumer, with the live numbers."""
    ids = await _fleet(redis_client, stream)
    text = render(await fleet_status(redis_client, [stream], "audit-writers"))

    lines = text.splitlines()
    assert lines[0].startswith("Fleet status at ")
    stream_row = next(line for line in lines if line.startswith(stream + " "))
    assert stream_row.split() == [stream, "8", ids[0], ids[-1], "1"]
    header = next(line for line in lines if line.startswith("STREAM") and "LAG" in line)
    assert header.split() == ["STREAM", "GROUP", "LAG", "PENDING", "OLDEST-PENDING",
                              "MAX-IDLE", "CONSUMERS", "LAST-DELIVERED-ID"]
    group_row = next(line for line in lines if " audit-writers " in line and ids[4] in line)
    cells = group_row.split()
    assert cells[:4] == [stream, "audit-writers", "3", "4"]
    assert cells[4].endswith(("ms", "s"))
    assert cells[5].endswith(("ms", "s"))
    assert cells[6:] == ["2", ids[4]]
    consumers = [line.split() for line in lines if "host-" in line]
    assert [row[2:4] for row in consumers] == [["host-a-1", "2"], ["host-b-7", "2"]]
    assert "archiver" not in text


@pytest.mark.redis
@pytest.mark.anyio
async def test_status_command_json_and_all_groups(
    redis_client: aioredis.Redis, stream: str, redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`status --json --all-groups` prints the schema-1 document with every group."""
    await _fleet(redis_client, stream)
    parser = argparse.ArgumentParser()
    status_cli.register(parser.add_subparsers())

    args = parser.parse_args(["status", "--redis-url", redis_url, "--stream", stream, "--json",
                              "--all-groups"])
    assert await args.func(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == 1
    assert doc["group"] is None
    (s,) = doc["streams"]
    assert (s["length"], s["dead_letter_length"]) == (8, 1)
    assert [(g["group"], g["lag"], g["pending"]) for g in s["groups"]] == [
        ("archiver", 0, 0), ("audit-writers", 3, 4)]

    args = parser.parse_args(["status", "--redis-url", redis_url, "--stream", stream])
    assert await args.func(args) == 0
    out = capsys.readouterr().out
    assert "host-a-1" in out
    assert "archiver" not in out


@pytest.mark.anyio
async def test_status_command_without_redis(capsys: pytest.CaptureFixture[str]) -> None:
    """When Redis cannot be reached the command says so and exits 1."""
    parser = argparse.ArgumentParser()
    status_cli.register(parser.add_subparsers())
    args = parser.parse_args(["status", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"])
    assert await args.func(args) == 1
    assert "cannot read the fleet status from Redis" in capsys.readouterr().err


@pytest.mark.redis
@pytest.mark.anyio
async def test_render_of_an_empty_fleet(redis_client: aioredis.Redis, stream: str) -> None:
    """A stream that does not exist yet shows as missing, with its group missing too."""
    text = render(await fleet_status(redis_client, [stream], "audit-writers"))
    rows = [line.split() for line in text.splitlines()]
    assert [stream, "missing", "-", "-", "0"] in rows
    assert [stream, "audit-writers", "missing", "-", "-", "-", "-", "-"] in rows
    assert "(no consumers)" in text

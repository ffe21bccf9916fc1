"""Dead-letter tooling against real Redis: list, show, replay and purge, with filters."""

from __future__ import annotations

import argparse
import json
import random
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from tests.helpers import ControlledStore, MemoryStore, as_text, stream_range
from worker import constants as c
from worker import dlq, samples
from worker.cli import dlq as dlq_cli
from worker.cli.output import when_ms as parse_when
from worker.consumer import Worker
from worker.dlq import DlqFilter, find, purge, replay
from worker.emitter import AuditEmitter
from worker.fleet import redis_time_ms
from worker.settings import Settings

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

T0 = 1_780_000_000_000  # a fixed dead-letter time (ms) for time-range tests


def event(workspace: str, n: int) -> bytes:
    return json.dumps({"v": 1, "eventId": f"e{n}", "workspaceId": workspace,
                       "type": "run.started", "workflowId": "wf", "runId": f"r{n}",
                       "ts": "2026-02-15T10:30:00Z"}).encode()


async def dead_letter(
    redis: aioredis.Redis, stream: str, *, reason: str, payload: bytes | None,
    at_ms: int | None = None, source_id: str = "1-1",
) -> str:
    """XADD a dead letter with the worker's fields (constants.DLQ_FIELDS)."""
    fields: dict[FieldT, EncodableT] = {
        "reason": reason, "error": f"{reason}: details", "stream": stream, "id": source_id,
        "deliveries": 2, "consumer": "host-1", "ts": at_ms or 0,
    }
    if payload is not None:
        fields["event"] = payload
    assert set(fields) <= set(c.DLQ_FIELDS)
    entry_id = await redis.xadd(c.dlq_key(stream), fields, id=f"{at_ms}-*" if at_ms else "*")
    return as_text(entry_id)


@pytest.fixture
async def seeded(redis_client: aioredis.Redis, stream: str) -> dict[str, str]:
    """Five dead letters: two workspaces, three reasons, one bad JSON, one without payload."""
    ids = {
        "a1": await dead_letter(redis_client, stream, reason=c.Reason.SCHEMA,
                                payload=event("ws-a", 1), at_ms=T0),
        "b1": await dead_letter(redis_client, stream, reason=c.Reason.STORE_REJECTED,
                                payload=event("ws-b", 2), at_ms=T0 + 60_000),
        "bad": await dead_letter(redis_client, stream, reason=c.Reason.INVALID_JSON,
                                 payload=b'{"workspaceId": "ws-a", oops', at_ms=T0 + 120_000),
        "a2": await dead_letter(redis_client, stream, reason=c.Reason.STORE_REJECTED,
                                payload=event("ws-a", 3), at_ms=T0 + 180_000),
        "none": await dead_letter(redis_client, stream, reason=c.Reason.MISSING_FIELD,
                                  payload=None, at_ms=T0 + 240_000),
    }
    return ids


def cli(redis_url: str, stream: str, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    dlq_cli.register(parser.add_subparsers())
    action, *rest = argv
    return parser.parse_args(["dlq", action, "--redis-url", redis_url, "--stream", stream, *rest])


async def test_list_parses_every_field(
    redis_client: aioredis.Redis, stream: str, seeded: dict[str, str]
) -> None:
    """Entries come back oldest first with reason, error, source, deliveries and workspace."""
    entries = await find(redis_client, [stream])
    assert [e.id for e in entries] == list(seeded.values())
    first = entries[0]
    assert (first.reason, first.error, first.stream, first.source_id, first.deliveries,
            first.consumer, first.ts_ms) == (
        c.Reason.SCHEMA, "schema_violation: details", stream, "1-1", 2, "host-1", T0)
    assert first.event == event("ws-a", 1)
    assert first.source_stream == stream
    assert [e.workspace for e in entries] == ["ws-a", "ws-b", None, "ws-a", None]


async def test_filters(redis_client: aioredis.Redis, stream: str, seeded: dict[str, str]) -> None:
    """Reason, workspace, time range, IDs and limit each narrow the selection."""
    async def ids(**kw: Any) -> list[str]:
        return [e.id for e in await find(redis_client, [stream], DlqFilter(**kw))]

    assert await ids(reasons=(c.Reason.STORE_REJECTED,)) == [seeded["b1"], seeded["a2"]]
    assert await ids(workspaces=("ws-a",)) == [seeded["a1"], seeded["a2"]]
    assert await ids(reasons=(c.Reason.STORE_REJECTED,), workspaces=("ws-a",)) == [seeded["a2"]]
    assert await ids(since_ms=T0 + 60_000, until_ms=T0 + 180_000) == [
        seeded["b1"], seeded["bad"], seeded["a2"]]
    assert await ids(until_ms=T0 + 59_999) == [seeded["a1"]]
    assert await ids(ids=(seeded["none"], seeded["a1"], "9-9")) == [seeded["a1"], seeded["none"]]
    assert await ids(limit=2) == [seeded["a1"], seeded["b1"]]
    assert await ids(limit=0) == []


def test_parse_when() -> None:
    """Time arguments: durations before now, ISO 8601 (UTC if naive) or epoch ms."""
    now = 1_800_000_000_000
    assert parse_when("90s", now) == now - 90_000
    assert parse_when("2h", now) == now - 7_200_000
    assert parse_when("7d", now) == now - 7 * 86_400_000
    assert parse_when("1.5m", now) == now - 90_000
    assert parse_when("1780000000000", now) == 1_780_000_000_000
    iso = datetime(2026, 2, 15, 10, 30, tzinfo=UTC)
    assert parse_when("2026-02-15T10:30:00Z", now) == int(iso.timestamp() * 1000)
    assert parse_when("2026-02-15T10:30:00", now) == int(iso.timestamp() * 1000)
    assert parse_when("2026-02-15T11:30:00+01:00", now) == int(iso.timestamp() * 1000)
    with pytest.raises(ValueError, match="not a time"):
        parse_when("yesterday", now)


async def test_list_command_table_and_json(
    redis_client: aioredis.Redis, stream: str, redis_url: str, seeded: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`dlq list` prints a table, or stable JSON with --json; filters come from flags."""
    args = cli(redis_url, stream, "list", "--workspace", "ws-a")
    assert await args.func(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["DLQ", "ID", "DEAD-LETTERED", "(UTC)"]
    assert seeded["a1"] in out
    assert seeded["a2"] in out
    assert seeded["b1"] not in out

    since = datetime.fromtimestamp((T0 + 100_000) / 1000, tz=UTC).isoformat()
    args = cli(redis_url, stream, "list", "--since", since, "--reason", "store_rejected",
               "--json")
    assert await args.func(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["version"], doc["command"], doc["count"]) == (1, "list", 1)
    (entry,) = doc["entries"]
    assert set(entry) == {"dlq", "id", "dead_lettered_at", "ts_ms", "reason", "error", "stream",
                          "source_id", "deliveries", "consumer", "workspace", "event_bytes"}
    assert (entry["id"], entry["workspace"], entry["event_bytes"]) == (
        seeded["a2"], "ws-a", len(event("ws-a", 3)))
    assert "event" not in entry, "list never prints payloads"


async def test_show_command(
    redis_client: aioredis.Redis, stream: str, redis_url: str, seeded: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`dlq show` prints fields and the payload; an unknown ID makes the exit code 1."""
    binary = await dead_letter(redis_client, stream, reason="x", payload=b"\xff\xfe")
    args = cli(redis_url, stream, "show", seeded["a1"])
    assert await args.func(args) == 0
    out = capsys.readouterr().out
    assert "reason:           schema_violation" in out
    assert '"workspaceId": "ws-a"' in out

    args = cli(redis_url, stream, "show", seeded["bad"], binary, "5-5", "--json")
    assert await args.func(args) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["missing"] == ["5-5"]
    bad, raw = doc["entries"]
    assert (bad["event"], bad["event_encoding"]) == ('{"workspaceId": "ws-a", oops', "utf-8")
    assert (raw["event"], raw["event_encoding"]) == ("//4=", "base64")


async def test_replay_moves_entries_back_to_the_stream(
    redis_client: aioredis.Redis, stream: str, seeded: dict[str, str]
) -> None:
    """Replay XADDs the original bytes to the source stream, then deletes the dead letter."""
    entries = await find(redis_client, [stream], DlqFilter(workspaces=("ws-a",)))
    result = await replay(redis_client, entries)

    assert set(result.replayed) == {seeded["a1"], seeded["a2"]}
    in_stream = await stream_range(redis_client, stream)
    assert [(i.decode(), f) for i, f in in_stream] == [
        (result.replayed[seeded["a1"]], {b"event": event("ws-a", 1)}),
        (result.replayed[seeded["a2"]], {b"event": event("ws-a", 3)}),
    ]
    left = [e.id for e in await find(redis_client, [stream])]
    assert left == [seeded["b1"], seeded["bad"], seeded["none"]]


async def test_replay_skips_entries_without_payload(
    redis_client: aioredis.Redis, stream: str, seeded: dict[str, str]
) -> None:
    """An entry with no event field cannot be replayed: it is skipped and kept."""
    entries = await find(redis_client, [stream], DlqFilter(ids=(seeded["none"],)))
    result = await replay(redis_client, entries)
    assert (result.replayed, result.skipped) == ({}, [seeded["none"]])
    assert await redis_client.xlen(c.dlq_key(stream)) == 5


async def test_crash_between_enqueue_and_delete_duplicates_never_loses(
    redis_client: aioredis.Redis, stream: str, seeded: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If replay dies after its XADD, the event is in both places; a rerun completes it."""
    async def crash(*_: Any) -> None:
        raise ConnectionError("killed between XADD and XDEL")

    entries = await find(redis_client, [stream], DlqFilter(ids=(seeded["b1"],)))
    with monkeypatch.context() as patch:
        patch.setattr(dlq, "_delete_replayed", crash)
        with pytest.raises(ConnectionError):
            await replay(redis_client, entries)
    assert [f[b"event"] for _, f in await stream_range(redis_client, stream)] == [event("ws-b", 2)]
    assert [e.id for e in await find(redis_client, [stream], DlqFilter(reasons=(
        c.Reason.STORE_REJECTED,)))] == [seeded["b1"], seeded["a2"]]

    entries = await find(redis_client, [stream], DlqFilter(ids=(seeded["b1"],)))
    result = await replay(redis_client, entries)
    assert list(result.replayed) == [seeded["b1"]]
    assert [f[b"event"] for _, f in await stream_range(redis_client, stream)] == [
        event("ws-b", 2)] * 2
    assert seeded["b1"] not in [e.id for e in await find(redis_client, [stream])]


async def test_replay_and_purge_many_entries_across_pages(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """More entries than one XRANGE page: every matching one is replayed or purged once."""
    async with redis_client.pipeline(transaction=False) as pipe:
        for n in range(1200):
            reason = c.Reason.STORE_REJECTED if n % 2 else c.Reason.SCHEMA
            pipe.xadd(c.dlq_key(stream), {"reason": reason, "stream": stream,
                                          "event": event("ws", n)})
        await pipe.execute()

    rejected = await find(redis_client, [stream], DlqFilter(reasons=(c.Reason.STORE_REJECTED,)))
    assert len(rejected) == 600
    result = await replay(redis_client, rejected)
    assert len(result.replayed) == 600
    assert await redis_client.xlen(stream) == 600
    assert await redis_client.xlen(c.dlq_key(stream)) == 600

    assert await purge(redis_client, await find(redis_client, [stream])) == 600
    assert await redis_client.xlen(c.dlq_key(stream)) == 0


async def test_purge_command_needs_yes(
    redis_client: aioredis.Redis, stream: str, redis_url: str, seeded: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without --yes purge deletes nothing and exits 1; with --yes only matches go."""
    args = cli(redis_url, stream, "purge", "--reason", "store_rejected")
    assert await args.func(args) == 1
    assert "2 dead letters match; pass --yes" in capsys.readouterr().err
    assert await redis_client.xlen(c.dlq_key(stream)) == 5

    args = cli(redis_url, stream, "purge", "--reason", "store_rejected", "--yes", "--json")
    assert await args.func(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["deleted"], doc["matched"], doc["confirmed"]) == (2, 2, True)
    left = [e.reason for e in await find(redis_client, [stream])]
    assert left == [c.Reason.SCHEMA, c.Reason.INVALID_JSON, c.Reason.MISSING_FIELD]


async def test_replay_command_dry_run_and_bad_time(
    redis_client: aioredis.Redis, stream: str, redis_url: str, seeded: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--dry-run lists and changes nothing; an unreadable --since is a configuration error."""
    from worker.errors import ConfigError

    args = cli(redis_url, stream, "replay", "--reason", "schema_violation", "--dry-run")
    assert await args.func(args) == 0
    assert "would replay 1 dead letters" in capsys.readouterr().out
    assert await redis_client.exists(stream) == 0

    args = cli(redis_url, stream, "replay", "--since", "last tuesday")
    with pytest.raises(ConfigError, match="not a time"):
        await args.func(args)


async def test_replayed_events_are_stored_by_the_worker(
    redis_client: aioredis.Redis, stream: str, redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """End to end: a run the store rejected is dead-lettered, replayed after the fix, stored."""
    run = samples.lead_triage_run(random.Random(3), "ws1", "run-x", prompt_size=lambda r: 100)
    await AuditEmitter(redis_client, [stream]).emit_many(samples.run_events(run, snapshot=True))
    store = ControlledStore(MemoryStore())
    store.reject_runs.add("run-x")
    settings = Settings(redis_url=redis_url, streams=(stream,), metrics_port=0, block_ms=50,
                        burst=True, consumer="w1", shutdown_grace_s=5, store_url="null://")
    with anyio.fail_after(30):
        await Worker(settings, store, redis_client).run()
    assert await store.get_run("ws1", "run-x") is None
    assert await redis_client.xlen(c.dlq_key(stream)) == 1  # the run's one snapshot event

    store.reject_runs.clear()
    start = await redis_time_ms(redis_client)
    args = cli(redis_url, stream, "replay", "--reason", c.Reason.STORE_REJECTED,
               "--workspace", "ws1", "--until", str(start))
    assert await args.func(args) == 0
    assert "replayed" in capsys.readouterr().out
    assert await redis_client.xlen(c.dlq_key(stream)) == 0
    with anyio.fail_after(30):
        await Worker(settings, store, redis_client).run()
    doc = await store.get_run("ws1", "run-x")
    assert doc is not None
    assert doc["status"] == run["status"]


async def _fill(redis: aioredis.Redis, stream: str, n: int, size: int) -> None:
    """``n`` dead letters of ``size``-byte payloads (valid JSON events)."""
    pad = "x" * max(0, size - len(event("ws", 0)) - 12)
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(n):
            body = json.loads(event("ws", i))
            body["pad"] = pad
            pipe.xadd(c.dlq_key(stream), {"reason": c.Reason.STORE_REJECTED, "stream": stream,
                                          "event": json.dumps(body)})
            if len(pipe) >= 1000:
                await pipe.execute()
        await pipe.execute()


async def _peak_bytes(action: Any) -> int:
    """Peak Python heap while ``action()`` runs (tracemalloc), its stdout discarded."""
    import contextlib
    import os
    import tracemalloc

    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # noqa: ASYNC230
        tracemalloc.start()
        try:
            await action()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()


@pytest.mark.slow
async def test_replay_and_dry_run_memory_does_not_grow_with_the_dead_letters(
    redis_client: aioredis.Redis, redis_url: str,
) -> None:
    """Regression: replay --dry-run collected every dead letter first (880 MB for 200k).
    The peak heap of a dry run (text and JSON) and of a replay over 10 x N dead letters
    is about that over N (pages and chunks, never the whole stream), and far below the
    payload bytes; every dead letter is still replayed once."""
    n, size = 520, 4000
    small, large = f"test:{random.getrandbits(48):x}:a", f"test:{random.getrandbits(48):x}:b"
    try:
        await _fill(redis_client, small, n, size)
        await _fill(redis_client, large, 10 * n, size)
        peaks: dict[str, list[int]] = {}
        for name in (small, large):
            for mode in (["--dry-run"], ["--dry-run", "--json"], ["--json"]):
                args = cli(redis_url, name, "replay", *mode)
                peak = await _peak_bytes(lambda args=args: args.func(args))
                peaks.setdefault(" ".join(mode), []).append(peak)
        for label, (peak_n, peak_10n) in peaks.items():
            assert peak_10n < 1.5 * peak_n, (label, peaks)
            assert peak_10n < 10 * n * size / 3, (label, peaks)  # not the payloads
        assert await redis_client.xlen(small) == n
        assert await redis_client.xlen(large) == 10 * n
        assert await redis_client.xlen(c.dlq_key(small)) == 0
        assert await redis_client.xlen(c.dlq_key(large)) == 0
    finally:
        for name in (small, large):
            await redis_client.delete(name, c.dlq_key(name))


async def test_replay_deletes_only_what_redis_confirmed_and_does_not_loop(
    redis_client: aioredis.Redis, stream: str, redis_url: str, seeded: dict[str, str],
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Streamed replay settles each chunk safely: an XADD Redis refuses (the source key
    holds another type) leaves that dead letter in place and exits 1; and dead letters
    written while the replay runs (its events failing again) are not replayed by the
    same run."""
    other = f"{stream.rsplit(':', 1)[0]}:other"
    await redis_client.set(other, "not a stream")
    refused = await dead_letter(redis_client, other, reason=c.Reason.SCHEMA,
                                payload=event("ws-a", 9))
    chunk = dlq._replay_chunk
    appended: list[str] = []

    async def and_fail_again(redis: aioredis.Redis, entries: list[Any]) -> Any:
        result = await chunk(redis, entries)
        for e in entries:  # each replayed event is dead-lettered again at once
            appended.append(await dead_letter(redis, e.source_stream, reason="again",
                                              payload=e.event))
        return result

    monkeypatch.setattr(dlq, "_replay_chunk", and_fail_again)
    args = cli(redis_url, f"{stream},{other}", "replay", "--json")
    assert await args.func(args) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert set(doc["replayed"]) == {seeded["a1"], seeded["b1"], seeded["bad"], seeded["a2"]}
    assert doc["skipped"] == [seeded["none"]]
    assert list(doc["failed"]) == [refused]
    assert "WRONGTYPE" in doc["failed"][refused]
    assert f"{refused}: not replayed" in captured.err
    assert await redis_client.xlen(stream) == 4
    left = {e.id for e in await find(redis_client, [stream, other])}
    assert left == {seeded["none"], refused, *appended}  # the new ones wait for a later run
    assert len(appended) == 5

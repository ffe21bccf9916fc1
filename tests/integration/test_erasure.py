"""Erasure end to end: subjects hashed by the worker, `audit-fleet erase`, explain."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from worker.cli import main
from worker.consumer import Worker
from worker.emitter import AuditEmitter, make_event
from worker.erasure import subject_hash
from worker.explain import explain_run
from worker.settings import Settings
from worker.stores import migrate
from worker.stores.sqlite import SQLiteStore

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

KEY = b"the-subject-key-of-this-test-0123"


def run_events(run_id: str, subjects: list[str] | None) -> list[dict[str, Any]]:
    ts = "2026-02-15T10:30:00Z"
    extra: dict[str, Any] = {"subjects": subjects} if subjects is not None else {}
    return [
        make_event("run.started", "ws1", "wf", run_id, eventId=f"{run_id}-s", ts=ts,
                   trigger={"type": "webhook", "source": "gmail"}, **extra),
        make_event("node.completed", "ws1", "wf", run_id, eventId=f"{run_id}-n", ts=ts,
                   node={"nodeId": "classify", "type": "ai", "input": {"prompt": "Hi Ann"},
                         "output": "lead", "completedAt": ts},
                   subjects=["email:node-level@example.com"]),
        make_event("run.completed", "ws1", "wf", run_id, eventId=f"{run_id}-e", ts=ts),
    ]


async def test_subjects_are_stored_as_keyed_hashes_and_erased(
    redis_client: aioredis.Redis, stream: str, redis_url: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker stores subjects only as keyed hashes; `erase` finds the subject's runs,
    strips their prompts and outputs, and `explain` of an erased run says what and when."""
    key_file = tmp_path / "subject.key"
    key_file.write_text(base64.b64encode(KEY).decode())
    db = tmp_path / "audit.db"
    emitter = AuditEmitter(redis_client, [stream])
    await emitter.emit_many(run_events("r1", ["email:ann@example.com", "crm:42"])
                            + run_events("r2", ["crm:7"]))
    settings = Settings(redis_url=redis_url, streams=(stream,), metrics_port=0, block_ms=50,
                        burst=True, consumer="w1", store_url=f"sqlite:///{db}",
                        subject_key_file=str(key_file))
    assert "the-subject-key" not in repr(settings)
    store = SQLiteStore(f"sqlite:///{db}")
    await store.open()
    await migrate(store)
    try:
        with anyio.fail_after(30):
            await Worker(settings, store, redis_client).run()
        run = await store.get_run("ws1", "r1")
        assert run is not None
        assert run["subjects"] == sorted([subject_hash(KEY, "email:ann@example.com"),
                                          subject_hash(KEY, "crm:42")])
        (node,) = await store.get_nodes("ws1", "r1")
        assert "subjects" not in node  # a node event's own subjects are never stored
        stored = db.read_bytes()
        assert b"ann@example.com" not in stored
        assert b"node-level@example.com" not in stored
    finally:
        await store.close()

    monkeypatch.setenv("AUDIT_SUBJECT_KEY_FILE", str(key_file))
    monkeypatch.setenv("AUDIT_STORE_URL", f"sqlite:///{db}")
    capsys.readouterr()  # the worker's log lines
    args = ["erase", "-w", "ws1", "--subject", "email:ann@example.com", "--by", "dpo@corp"]
    assert await anyio.to_thread.run_sync(main, [*args, "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert (dry["runs"], dry["nodesErased"], dry["erasureId"]) == (["r1"], 1, None)
    assert await anyio.to_thread.run_sync(main, args) == 0
    out = capsys.readouterr().out
    assert "erased 1 node trace(s)" in out
    assert "- r1" in out

    store = SQLiteStore(f"sqlite:///{db}")
    await store.open()
    await migrate(store)
    try:
        (node,) = await store.get_nodes("ws1", "r1")
        assert "input" not in node
        assert "output" not in node
        (kept,) = await store.get_nodes("ws1", "r2")
        assert kept["input"] == {"prompt": "Hi Ann"}
        ex = await explain_run(store, "ws1", "r1", show_prompts=True)
        assert ex is not None
        assert ex.to_json()["run"]["erasure"]["by"] == "dpo@corp"
        assert ex.steps[0].input is None
    finally:
        await store.close()
    assert await anyio.to_thread.run_sync(main, ["explain", "r1", "-w", "ws1"]) == 0
    text = capsys.readouterr().out
    assert "Erased: node error, node input, node output, run error at " in text
    assert "by dpo@corp (erasure record erasure-" in text


async def test_subjects_without_a_key_are_not_stored(
    redis_client: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """Without AUDIT_SUBJECT_KEY_FILE the worker drops subjects: never stored in clear."""
    from tests.helpers import MemoryStore

    await AuditEmitter(redis_client, [stream]).emit_many(run_events("r1", ["crm:42"]))
    store = MemoryStore()
    settings = Settings(redis_url=redis_url, streams=(stream,), metrics_port=0, block_ms=50,
                        burst=True, consumer="w1")
    with anyio.fail_after(30):
        await Worker(settings, store, redis_client).run()
    run = await store.get_run("ws1", "r1")
    assert run is not None
    assert "subjects" not in run
    assert "crm:42" not in json.dumps(run, default=str)


async def test_erase_reports_the_archived_runs_it_cannot_erase(tmp_path: Path) -> None:
    """Runs of the subject already archived are listed (erasure result, CLI), not erased;
    the hash chain still verifies; hot runs are erased."""
    from worker import events as ev
    from worker.archive import Archive
    from worker.documents import coalesce
    from worker.erasure import erase, hash_subjects
    from worker.retention import Policy, run_retention

    store = SQLiteStore(f"sqlite:///{tmp_path}/a.db")
    await store.open()
    await migrate(store)
    try:
        items: list[tuple[int, ev.Decoded]] = []
        for run_id, day in [("old1", "2026-01-05"), ("old2", "2026-02-05"),
                            ("old3", "2026-03-05"), ("hot", "2027-05-20")]:
            for e in run_events(run_id, ["email:ann@example.com"]):
                e = dict(e, ts=f"{day}T10:30:00Z")
                if "node" in e:
                    e["node"] = dict(e["node"], completedAt=e["ts"])
                d = ev.decode(ev.encode(e), max_bytes=1 << 24)
                hash_subjects(d.doc, KEY)
                items.append((len(items), d))
        await store.write(coalesce(items))
        archive = Archive.at(tmp_path / "arch")
        from datetime import UTC, datetime
        await run_retention(store, Policy(), now=datetime(2027, 6, 1, tzinfo=UTC),
                            archive=archive, apply=True, workspaces=["ws1"])
        assert len(archive.manifests("ws1")) == 3
        report = await erase(store, "ws1", "email:ann@example.com", KEY, by="dpo",
                             archive=archive)
        assert report.runs == ["hot"]
        assert sorted(report.archived) == ["old1", "old2", "old3"]
        assert all(len(segments) == 1 for segments in report.archived.values())
        record = await store.get_run("ws1", str(report.erasure_id))
        assert record is not None
        assert sorted(record["erasureResult"]["archivedNotErased"]) == ["old1", "old2", "old3"]
        assert archive.verify("ws1").ok
    finally:
        await store.close()

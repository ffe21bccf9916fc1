"""Crypto-shredding end to end (SQLite and PostgreSQL): retention encrypts archived personal
fields, `erase` shreds the subject's data keys, the archive still verifies and says so."""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.helpers import StoreProxy
from worker import events as ev
from worker.archive import Archive
from worker.cli import main
from worker.documents import coalesce
from worker.emitter import make_event
from worker.erasure import ERASURE_WORKFLOW, erase, hash_subjects, subject_hash
from worker.retention import Policy, run_retention
from worker.shredding import MasterKey
from worker.stores import RunQuery, Store, migrate, open_store
from worker.stores.base import StoredKey

pytestmark = pytest.mark.anyio

SUBJECT_KEY = b"the-subject-key-of-the-shredding-test"
MASTER = bytes(range(32))
NOW = datetime(2027, 6, 1, tzinfo=UTC)
#: (run, day, subject, prompt): three archived months of ann, one hot run, one of bob.
RUNS = [("old1", "2026-01-05", "email:ann@example.com", "ann-jan"),
        ("old2", "2026-02-05", "email:ann@example.com", "ann-feb"),
        ("bob1", "2026-02-06", "email:bob@example.com", "bob-feb"),
        ("old3", "2026-03-05", "email:ann@example.com", "ann-mar"),
        ("hot", "2027-05-20", "email:ann@example.com", "ann-may")]


async def write_runs(store: Store) -> None:
    items: list[tuple[int, ev.Decoded]] = []
    for run_id, day, subject, prompt in RUNS:
        ts = f"{day}T10:30:00Z"
        for e in [
            make_event("run.started", "ws1", "wf", run_id, eventId=f"{run_id}-s", ts=ts,
                       subjects=[subject]),
            make_event("node.completed", "ws1", "wf", run_id, eventId=f"{run_id}-n", ts=ts,
                       node={"nodeId": "classify", "type": "ai", "input": {"prompt": prompt},
                             "output": f"out-{prompt}", "completedAt": ts}),
            make_event("run.completed", "ws1", "wf", run_id, eventId=f"{run_id}-e", ts=ts),
        ]:
            d = ev.decode(ev.encode(e), max_bytes=1 << 24)
            hash_subjects(d.doc, SUBJECT_KEY)
            items.append((len(items), d))
    await store.write(coalesce(items))


def segment_bytes(root: Path) -> bytes:
    return b"".join(gzip.decompress(p.read_bytes()) for p in sorted(root.glob("ws1/*.jsonl.gz")))


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any]:
    code = main(list(args))
    return code, json.loads(capsys.readouterr().out)


class Crash(Exception):
    pass


async def test_subject_erased_across_hot_storage_and_three_archived_months(
    store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    arch = tmp_path / "arch"
    store = open_store(store_url)
    await store.open()
    await migrate(store)
    try:
        await write_runs(store)
        archive = Archive.at(arch)
        master = MasterKey(MASTER)

        def crash_once(step: str, seen: list[str] = []) -> None:  # noqa: B006
            if step == "verify" and not seen:
                seen.append(step)
                raise Crash(step)

        with pytest.raises(Crash):  # segment committed, hot storage not yet changed
            await run_retention(store, Policy(), now=NOW, archive=archive, apply=True,
                                workspaces=["ws1"], fault=crash_once, master=master)
        archive.fault = None
        (report,) = await run_retention(store, Policy(), now=NOW, archive=archive,
                                        apply=True, workspaces=["ws1"], master=master)
        # the rerun recognises the committed (encrypted) month: archives the other two only
        assert [m["period"] for m in archive.manifests("ws1")] == ["2026-01", "2026-02",
                                                                    "2026-03"]
        assert report.docs_archived == 6  # Feb (old2, bob1) and Mar (old3): run + node each
        assert report.runs_deleted == 4
        raw = segment_bytes(arch)
        for prompt in ("ann-jan", "ann-feb", "bob-feb", "ann-mar"):
            assert prompt.encode() not in raw  # personal fields are encrypted
        assert raw.count(b'"$enc":"aes-256-gcm"') == 8  # input + output of 4 node records
        keys = await store.data_keys("ws1")
        assert sorted(k.run_id for k in keys) == ["bob1", "old1", "old2", "old3"]
        assert all(k.wrapped is not None and MASTER not in k.wrapped for k in keys)
    finally:
        await store.close()

    key_file = tmp_path / "subject.key"
    key_file.write_text(base64.b64encode(SUBJECT_KEY).decode())
    master_file = tmp_path / "master.key"
    master_file.write_text(base64.b64encode(MASTER).decode())
    monkeypatch.setenv("AUDIT_SUBJECT_KEY_FILE", str(key_file))
    monkeypatch.setenv("AUDIT_ARCHIVE_MASTER_KEY_FILE", str(master_file))
    monkeypatch.setenv("AUDIT_STORE_URL", store_url)
    before = segment_bytes(arch)

    # before erasure every archived field reads back
    code, ex = await anyio.to_thread.run_sync(
        cli_json, capsys, "explain", "old2", "-w", "ws1", "--archive", str(arch),
        "--show-prompts", "--json")
    assert code == 0
    assert ex["nodes"][0]["input"] == {"prompt": "ann-feb"}

    code, out = await anyio.to_thread.run_sync(
        cli_json, capsys, "erase", "-w", "ws1", "--subject", "email:ann@example.com",
        "--by", "dpo@corp", "--archive-dir", str(arch), "--json")
    assert code == 0
    assert out["runs"] == ["hot"]
    assert out["nodesErased"] == 1
    assert sorted(out["archivedShredded"]) == ["old1", "old2", "old3"]
    assert out["archivedNotErased"] == {}
    assert (out["keysShredded"], out["keysShreddedTotal"]) == (3, 3)
    assert segment_bytes(arch) == before  # segments untouched

    code, verify = await anyio.to_thread.run_sync(
        cli_json, capsys, "archive", "verify", "--archive-dir", str(arch), "--json")
    assert code == 0
    assert verify["ok"] is True
    assert verify["workspaces"][0]["erasure"] == {
        "sealedRecords": 4, "shreddedRecords": 3, "shreddedRuns": ["old1", "old2", "old3"],
        "missingKeyRecords": 0, "missingKeyRuns": []}
    assert await anyio.to_thread.run_sync(
        main, ["archive", "verify", "--archive-dir", str(arch)]) == 0
    text = capsys.readouterr().out
    assert "ws1: OK  3 segments, 8 records" in text
    assert "3 records of 3 runs crypto-shredded (keys deleted)" in text

    code, ex = await anyio.to_thread.run_sync(
        cli_json, capsys, "explain", "old2", "-w", "ws1", "--archive", str(arch),
        "--show-prompts", "--json")
    assert code == 0
    erased = ex["nodes"][0]["input"]
    assert erased["erased"] is True
    assert erased["at"].startswith(str(datetime.now(UTC).year))
    code, ex = await anyio.to_thread.run_sync(
        cli_json, capsys, "explain", "bob1", "-w", "ws1", "--archive", str(arch),
        "--show-prompts", "--json")
    assert ex["nodes"][0]["input"] == {"prompt": "bob-feb"}  # another subject still decrypts

    assert await anyio.to_thread.run_sync(
        main, ["archive", "restore", "-w", "ws1", "--archive-dir", str(arch),
               "--run", "old1", "--run", "bob1"]) == 0
    capsys.readouterr()
    store = open_store(store_url)
    await store.open()
    await migrate(store)
    try:
        (node,) = await store.get_nodes("ws1", "old1")
        assert node["input"]["erased"] is True
        assert node["output"]["erased"] is True
        (node,) = await store.get_nodes("ws1", "bob1")
        assert (node["input"], node["output"]) == ({"prompt": "bob-feb"}, "out-bob-feb")
        (hot,) = await store.get_nodes("ws1", "hot")
        assert "input" not in hot
        assert "output" not in hot
    finally:
        await store.close()


async def test_erasure_killed_at_key_deletion_and_rerun(store_url: str, tmp_path: Path) -> None:
    """A crash after the first run's keys are shredded: the rerun resumes the record and
    shreds the rest, once; the other subject's key is untouched."""
    store = open_store(store_url)
    await store.open()
    await migrate(store)
    try:
        await write_runs(store)
        archive = Archive.at(tmp_path / "arch")
        await run_retention(store, Policy(), now=NOW, archive=archive, apply=True,
                            workspaces=["ws1"], master=MasterKey(MASTER))

        steps: list[str] = []

        def crash(step: str) -> None:  # runs in order hot, old1, ...: after old1's keys
            steps.append(step)
            if steps.count("keys") == 2:
                raise Crash(step)

        with pytest.raises(Crash):
            await erase(store, "ws1", "email:ann@example.com", SUBJECT_KEY, by="dpo",
                        archive=archive, fault=crash)
        live = {k.run_id for k in await store.data_keys("ws1") if k.wrapped is not None}
        assert live == {"bob1", "old2", "old3"}  # old1's key went before the crash
        report = await erase(store, "ws1", "email:ann@example.com", SUBJECT_KEY, by="dpo",
                             archive=archive)
        assert report.resumed
        assert (report.keys_shredded, report.keys_shredded_total) == (2, 3)
        live = {k.run_id for k in await store.data_keys("ws1") if k.wrapped is not None}
        assert live == {"bob1"}
        records = await store.list_runs("ws1", RunQuery(workflow_id=ERASURE_WORKFLOW))
        assert [r["runId"] for r in records] == [report.erasure_id]  # resumed, not a second
        record = await store.get_run("ws1", str(report.erasure_id))
        assert record is not None
        assert record["status"] == "completed"
        assert record["erasureResult"]["keysShredded"] == 3
        again = await erase(store, "ws1", "email:ann@example.com", SUBJECT_KEY, by="dpo",
                            archive=archive)
        assert (again.keys_shredded, again.keys_shredded_total) == (0, 3)
        assert archive.verify("ws1").ok
    finally:
        await store.close()


async def test_configured_personal_paths_are_sealed_in_archives_and_shredded(
    store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With AUDIT_PERSONAL_FIELDS, retention seals those paths (nested trigger metadata,
    run-level fields, node metadata) in archived records; erase shreds them with the run's
    key: the archive still verifies, explain --archive reads them as erased, another
    subject's run still decrypts, and explain of the erased hot run names every path."""
    from tests.store_conformance import PERSONAL, personal_events
    from tests.store_conformance import write as write_events

    ann = subject_hash(SUBJECT_KEY, "email:ann@example.com")
    bob = subject_hash(SUBJECT_KEY, "email:bob@example.com")
    store = open_store(store_url)
    await store.open()
    await migrate(store)
    try:
        await write_events(store, personal_events("ws1", "old", [ann])
                           + personal_events("ws1", "bobs", [bob]))
    finally:
        await store.close()
    arch = tmp_path / "arch"
    for name, value in (("subject.key", SUBJECT_KEY), ("master.key", MASTER)):
        (tmp_path / name).write_text(base64.b64encode(value).decode())
    monkeypatch.setenv("AUDIT_SUBJECT_KEY_FILE", str(tmp_path / "subject.key"))
    monkeypatch.setenv("AUDIT_ARCHIVE_MASTER_KEY_FILE", str(tmp_path / "master.key"))
    monkeypatch.setenv("AUDIT_STORE_URL", store_url)
    monkeypatch.setenv("AUDIT_PERSONAL_FIELDS", ",".join(
        f"{kind}.{name}" for kind in ("node", "run") for name in PERSONAL.names(kind)
        if name not in ("error", "input", "output")))
    code, _ = await anyio.to_thread.run_sync(
        cli_json, capsys, "retention", "run", "--archive-dir", str(arch), "--now",
        "2027-01-01T00:00:00Z", "--json")
    assert code == 0
    raw = segment_bytes(arch)
    assert b"lead@example.com" not in raw
    assert b"Lead Person" not in raw
    assert b'"tier":"gold"' in raw  # not personal: archived in clear
    assert b'"subject":"Hi"' in raw

    async def explained(run_id: str) -> Any:
        code, ex = await anyio.to_thread.run_sync(
            cli_json, capsys, "explain", run_id, "-w", "ws1", "--archive", str(arch),
            "--show-prompts", "--json")
        assert code == 0
        return ex

    ex = await explained("old")
    assert ex["run"]["trigger"]["metadata"] == {"email": "lead@example.com", "subject": "Hi"}
    assert ex["run"]["extra"]["customer"] == {"name": "Lead Person", "tier": "gold"}
    assert ex["run"]["extra"]["contact"] == "lead@example.com"
    assert ex["nodes"][0]["extra"]["metadata"] == {"contact": "lead@example.com",
                                                   "channel": "mail"}

    store = open_store(store_url)
    await store.open()
    await migrate(store)
    try:  # the subject's run is also still hot once more (a late copy)
        await write_events(store, personal_events("ws1", "hot", [ann]))
    finally:
        await store.close()
    code, out = await anyio.to_thread.run_sync(
        cli_json, capsys, "erase", "-w", "ws1", "--subject", "email:ann@example.com",
        "--by", "dpo@corp", "--archive-dir", str(arch), "--json")
    assert code == 0
    assert (out["runs"], sorted(out["archivedShredded"]), out["archivedNotErased"]) == (
        ["hot"], ["old"], {})
    assert out["fields"] == PERSONAL.to_json()
    assert segment_bytes(arch) == raw
    code, verify = await anyio.to_thread.run_sync(
        cli_json, capsys, "archive", "verify", "--archive-dir", str(arch), "--json")
    assert code == 0
    assert verify["ok"] is True
    assert verify["workspaces"][0]["erasure"]["shreddedRuns"] == ["old"]

    ex = await explained("old")
    email = ex["run"]["trigger"]["metadata"]["email"]
    assert email["erased"] is True
    assert ex["run"]["trigger"]["metadata"]["subject"] == "Hi"
    assert ex["run"]["extra"]["customer"]["name"]["erased"] is True
    assert ex["run"]["extra"]["customer"]["tier"] == "gold"
    assert ex["run"]["extra"]["contact"]["erased"] is True
    assert ex["nodes"][0]["extra"]["metadata"]["contact"]["erased"] is True
    assert ex["nodes"][0]["extra"]["metadata"]["channel"] == "mail"
    ex = await explained("bobs")
    assert ex["run"]["trigger"]["metadata"]["email"] == "lead@example.com"  # bob's key lives

    assert await anyio.to_thread.run_sync(main, ["explain", "hot", "-w", "ws1"]) == 0
    text = capsys.readouterr().out
    assert ("Erased: node error, node input, node metadata.contact, node output, "
            "run contact, run customer.name, run error, run trigger.metadata.email at") in text
    assert "lead@example.com" not in text


class Interleaved(StoreProxy):
    """A store whose ``nth`` call of ``method`` (``data_keys``, ``put_data_keys`` or
    ``runs_with_subject``) first runs ``hook`` (another command running at that moment),
    then goes on."""

    def __init__(self, store: Store, method: str, nth: int,
                 hook: Callable[[], Awaitable[None]]) -> None:
        super().__init__(store)
        self.method, self.nth, self.hook = method, nth, hook
        self.calls = 0

    async def _reached(self, method: str) -> None:
        if method == self.method:
            self.calls += 1
            if self.calls == self.nth:
                await self.hook()

    async def data_keys(self, workspace: str,
                        run_ids: Sequence[str] | None = None) -> list[StoredKey]:
        await self._reached("data_keys")
        return await super().data_keys(workspace, run_ids)

    async def put_data_keys(self, workspace: str, keys: Sequence[StoredKey]) -> None:
        await self._reached("put_data_keys")
        await super().put_data_keys(workspace, keys)

    async def runs_with_subject(self, workspace: str, subject: str) -> list[dict[str, Any]]:
        await self._reached("runs_with_subject")
        return await super().runs_with_subject(workspace, subject)


async def archived_inputs(store: Store, archive: Archive, run_id: str) -> Any:
    """The ``input`` of every archived node record of a run, opened with its keys."""
    from worker.shredding import load_opener

    opener = await load_opener(store, MasterKey(MASTER), "ws1", [run_id])
    return [doc.get("input") for _, kind, doc in archive.records("ws1", opener.open)
            if kind == "node" and doc["runId"] == run_id]


@pytest.mark.parametrize(("method", "nth"), [
    ("data_keys", 2),  # erasure runs after retention read the runs, before it looks for keys
    ("put_data_keys", 1),  # ... after it looked (none yet), before it stores a new key
])
async def test_erasure_during_retention_leaves_no_readable_archived_copy(
        store: Store, tmp_path: Path, method: str, nth: int) -> None:
    """An erasure that runs while a retention pass is between reading the subject's runs
    and committing their segment: the pass seals them under keys that end up shredded
    (the erasure's tombstones), so no archived copy of the subject reads back; the other
    subject's run does, and the archive verifies."""
    await write_runs(store)
    archive = Archive.at(tmp_path / "arch")
    master = MasterKey(MASTER)

    async def erasure() -> None:
        await erase(store, "ws1", "email:ann@example.com", SUBJECT_KEY, by="dpo",
                    archive=archive)

    racing = Interleaved(store, method, nth, erasure)
    await run_retention(racing, Policy(), now=NOW, archive=archive,
                        apply=True, workspaces=["ws1"], master=master)
    assert racing.calls >= nth  # the erasure did run in the middle
    await run_retention(store, Policy(), now=NOW, archive=archive, apply=True,
                        workspaces=["ws1"], master=master)  # the erased versions, deferred
    for run_id in ("old1", "old2", "old3"):
        for value in await archived_inputs(store, archive, run_id):
            assert value is None or value["erased"] is True, (run_id, value)
        assert await store.get_run("ws1", run_id) is None
    assert await archived_inputs(store, archive, "bob1") == [{"prompt": "bob-feb"}]
    assert archive.verify("ws1").ok


async def test_erasure_finds_runs_a_concurrent_retention_pass_moves_to_the_archive(
        store: Store, tmp_path: Path) -> None:
    """Retention archives and deletes the subject's runs between erasure's look at hot
    storage and its look at the archive: they are found there and shredded."""
    await write_runs(store)
    archive = Archive.at(tmp_path / "arch")

    async def retention() -> None:
        await run_retention(store, Policy(), now=NOW, archive=archive, apply=True,
                            workspaces=["ws1"], master=MasterKey(MASTER))

    racing = Interleaved(store, "runs_with_subject", 1, retention)
    report = await erase(racing, "ws1", "email:ann@example.com",
                         SUBJECT_KEY, by="dpo", archive=archive)
    assert report.runs == ["hot"]
    assert sorted(report.sealed) == ["old1", "old2", "old3"]
    for run_id in ("old1", "old2", "old3"):
        assert [v["erased"] for v in await archived_inputs(store, archive, run_id)] == [True]
    assert await archived_inputs(store, archive, "bob1") == [{"prompt": "bob-feb"}]

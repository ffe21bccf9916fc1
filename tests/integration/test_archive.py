"""Archives: verifiable segments, crash-safe idempotent archival, restore and explain."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import reference as ref
from tests.dataset import BASE, make_dataset
from tests.helpers import run_cli, workspace_name, write_events
from worker import archive as arc
from worker import events as ev
from worker import explain, retention
from worker.archive_blobs import S3BlobStore
from worker.cli import archive as archive_cli
from worker.cli import explain as explain_cli
from worker.cli import retention as retention_cli
from worker.documents import fold
from worker.errors import ArchiveError
from worker.stores import Store

pytestmark = pytest.mark.anyio


class Crash(Exception):
    """A simulated crash."""


def crash_at(step: str, after: int = 1) -> Callable[[str], None]:
    """A fault hook that raises the ``after``-th time ``step`` is reached."""
    seen = Counter[str]()

    def hook(name: str) -> None:
        seen[name] += 1
        if name == step and seen[name] == after:
            raise Crash(step)

    return hook


def sample_docs(workspace: str, runs: int = 6, seed: int = 1) -> list[tuple[str, dict[str, Any]]]:
    events, _ = make_dataset(workspace, runs=runs, seed=seed)
    run_docs, node_docs = fold(ev.decode(ev.encode(e), max_bytes=1 << 24) for e in events)
    out: list[tuple[str, dict[str, Any]]] = [("run", d) for _, d in sorted(run_docs.items())]
    out += [("node", d) for _, d in sorted(node_docs.items())]
    return out


def write_segment(archive: arc.Archive, ws: str, period: str,
                  records: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    spool = archive.spool(ws)
    for kind, doc in records:
        spool.add(kind, doc)
    return archive.append(ws, period, spool)


# -- segments, manifests and the chain -----------------------------------------------------

def test_segments_round_trip_with_manifest_and_chain(tmp_path: Path) -> None:
    """Records come back exactly; manifests hold counts, time range, SHA-256 and links."""
    archive = arc.Archive.at(tmp_path)
    records = sample_docs("wsa")
    first = write_segment(archive, "wsa", "2026-03", records[:10])
    second = write_segment(archive, "wsa", "2026-04", records[10:])
    back = [r for _, kind, doc in archive.records("wsa") for r in [(kind, doc)]]
    assert back == records
    assert first["seq"] == 1
    assert second["seq"] == 2
    assert first["prevChainHash"] == arc.GENESIS
    assert second["prevChainHash"] == first["chainHash"]
    assert first["counts"]["records"] == 10
    runs = sum(1 for k, _ in records[:10] if k == "run")
    assert first["counts"] == {"runs": runs, "nodes": 10 - runs, "records": 10}
    data = (tmp_path / "wsa" / first["segment"]).read_bytes()
    import hashlib

    assert hashlib.sha256(data).hexdigest() == first["sha256"]
    assert first["bytes"] == len(data)
    lines = gzip.decompress(data).decode().splitlines()
    assert len(lines) == 10
    assert json.loads(lines[0])["kind"] == records[0][0]
    assert first["timeRange"]["from"] <= first["timeRange"]["to"]
    head = json.loads((tmp_path / "wsa" / "HEAD.json").read_text())
    assert head["seq"] == 2
    assert head["chainHash"] == second["chainHash"]
    report = archive.verify("wsa")
    assert report.ok, report.problems
    assert report.segments == 2
    assert report.records == len(records)


def _three_segments(tmp_path: Path) -> tuple[arc.Archive, list[dict[str, Any]]]:
    archive = arc.Archive.at(tmp_path)
    records = sample_docs("wsv", runs=9)
    third = len(records) // 3
    manifests = [write_segment(archive, "wsv", f"2026-0{i + 1}",
                               records[i * third:(i + 1) * third]) for i in range(3)]
    assert archive.verify("wsv").ok
    return archive, manifests


def test_verify_detects_a_changed_byte(tmp_path: Path) -> None:
    """Flipping one byte of a segment fails verification and names the segment."""
    archive, manifests = _three_segments(tmp_path)
    path = tmp_path / "wsv" / manifests[1]["segment"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    report = archive.verify("wsv")
    assert not report.ok
    assert report.problems == ["segment 2: content changed (SHA-256 mismatch)"]


def test_verify_detects_a_changed_manifest(tmp_path: Path) -> None:
    """Editing a manifest (say, its counts) breaks its chain hash."""
    archive, manifests = _three_segments(tmp_path)
    path = tmp_path / "wsv" / manifests[0]["segment"].replace(".jsonl.gz", ".manifest.json")
    manifest = json.loads(path.read_text())
    manifest["counts"]["runs"] += 1
    path.write_text(json.dumps(manifest))
    report = archive.verify("wsv")
    assert any("manifest was modified" in p for p in report.problems)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_verify_detects_a_removed_segment(tmp_path: Path, which: int) -> None:
    """Removing any segment with its manifest (first, middle or last) is detected."""
    archive, manifests = _three_segments(tmp_path)
    stem = manifests[which]["segment"].replace(".jsonl.gz", "")
    (tmp_path / "wsv" / f"{stem}.jsonl.gz").unlink()
    (tmp_path / "wsv" / f"{stem}.manifest.json").unlink()
    report = archive.verify("wsv")
    assert not report.ok
    assert any(f"segment {which + 1}: manifest missing" in p for p in report.problems)
    if which < 2:
        assert any(f"segment {which + 2}: chain broken" in p for p in report.problems)


def test_verify_detects_a_removed_segment_file_alone(tmp_path: Path) -> None:
    """A segment file removed while its manifest stays is reported as missing."""
    archive, manifests = _three_segments(tmp_path)
    (tmp_path / "wsv" / manifests[2]["segment"]).unlink()
    assert archive.verify("wsv").problems == [
        f"segment 3: file {manifests[2]['segment']} missing"]


def test_crash_before_head_leaves_an_uncommitted_leftover(tmp_path: Path) -> None:
    """A segment written but not committed is ignored, reported, and removed by recover."""
    archive = arc.Archive.at(tmp_path, fault=crash_at("manifest"))
    records = sample_docs("wsc", runs=3)
    with pytest.raises(Crash):
        write_segment(archive, "wsc", "2026-03", records)
    archive.fault = None
    report = archive.verify("wsc")
    assert report.ok
    assert report.head_seq == 0
    assert len(report.leftovers) == 2
    assert list(archive.records("wsc")) == []
    removed = archive.recover("wsc")
    assert sorted(removed) == sorted(report.leftovers)
    assert write_segment(archive, "wsc", "2026-03", records)["seq"] == 1
    assert archive.verify("wsc").ok


def test_catalog_covers_stripped_versions_only(tmp_path: Path) -> None:
    """An archived doc covers its hot copy minus prompts/errors, not a changed one."""
    cat = arc.Catalog()
    node = {"runId": "r", "nodeKey": "k", "input": {"prompt": "p"}, "output": {"x": 1},
            "error": None, "nodeId": "n"}
    cat.add("node", node)
    assert cat.covers("node", node)
    assert cat.covers("node", {k: v for k, v in node.items() if k != "input"})
    assert not cat.covers("node", node | {"output": {"x": 2}})
    assert not cat.covers("node", {k: v for k, v in node.items() if k != "nodeId"})
    assert not cat.covers("node", node | {"late": True})
    run = {"runId": "r", "error": {"type": "E"}, "status": "failed"}
    cat.add("run", run)
    assert cat.covers("run", run | {"error": None})
    assert not cat.covers("run", run | {"status": "completed"})


# -- archival through retention: crash at every step -----------------------------------------

STEPS = ("spool", "segment", "manifest", "head", "verify", "hot")


async def _snapshot(store: Store, ws: str) -> dict[str, Any]:
    runs = {}
    for run_id in sorted(await _run_ids(store, ws)):
        ex = await explain.explain_run(store, ws, run_id, show_prompts=True)
        assert ex is not None
        runs[run_id] = ex.to_json()
    return runs


async def _run_ids(store: Store, ws: str) -> list[str]:
    from worker.stores import RunQuery

    return [d["runId"] for d in await store.list_runs(ws, RunQuery(limit=10_000))]


def _archived_runs(archive: arc.Archive, ws: str) -> set[str]:
    return {doc["runId"] for _, kind, doc in archive.records(ws) if kind == "run"}


def _assert_no_duplicates(archive: arc.Archive, ws: str) -> None:
    keys = Counter(arc.doc_key(kind, doc) for _, kind, doc in archive.records(ws))
    assert keys, "nothing archived"
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1]


@pytest.mark.parametrize("step", STEPS)
async def test_archival_killed_at_each_step_loses_nothing(store: Store, tmp_path: Path,
                                                          step: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash at any step leaves hot or verified archive; the rerun finishes, no duplicates."""
    monkeypatch.setattr(retention, "CHUNK", 5)  # several hot-storage chunks: crash between
    ws = workspace_name()
    events, _ = make_dataset(ws, runs=24, seed=8)
    await write_events(store, events)
    original = await _snapshot(store, ws)
    # every run is older than the run summaries' 90 days; the later ones only past 30 days
    now = BASE + timedelta(days=90, minutes=7 * 12)
    policy = retention.Policy(period="day")
    archive = arc.Archive.at(tmp_path / "archive")
    with pytest.raises(Crash):
        await retention.run_retention(store, policy, now=now, archive=archive, apply=True,
                                      workspaces=[ws], fault=crash_at(step))
    # right after the crash: every run is in hot storage or in a verified segment
    hot_now = set(await _run_ids(store, ws))
    archived = _archived_runs(archive, ws)
    assert archive.verify(ws).ok
    assert hot_now | archived == set(original)
    for run_id in set(original) - hot_now:
        found = await arc.read_run(archive, ws, run_id)
        assert found is not None
    # the rerun completes the job
    reports = await retention.run_retention(store, policy, now=now, archive=archive,
                                            apply=True, workspaces=[ws])
    assert archive.verify(ws).ok
    _assert_no_duplicates(archive, ws)
    assert _archived_runs(archive, ws) == set(original)
    for run_id, before in original.items():
        found = await arc.read_run(archive, ws, run_id)
        assert found is not None
        run, nodes, _ = found
        ex = explain.build(ws, run_id, run, nodes, show_prompts=True)
        assert ex.to_json()["nodes"] == before["nodes"]
        assert ex.to_json()["run"] == before["run"]
    # a third pass has nothing left to do
    again = await retention.run_retention(store, policy, now=now, archive=archive,
                                          apply=True, workspaces=[ws])
    assert again[0].runs_affected == 0
    assert again[0].segments == []
    assert bool(reports[0].recovered) == (step in ("segment", "manifest"))


# -- restore and explain --archive -----------------------------------------------------------

async def test_restore_then_explain_returns_the_original_run(store: Store, tmp_path: Path,
                                                             store_url: str,
                                                             capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    """After archival removed the reference run from hot storage, restore brings it back."""
    ws = workspace_name()
    await write_events(store, ref.reference_events(ws))
    before = await explain.explain_run(store, ws, ref.RUN_ID, show_prompts=True)
    assert before is not None
    archive_dir = tmp_path / "archive"
    now = ref.reference_events(ws)[0]["ts"]
    args = run_cli(retention_cli.register, [
        "retention", "run", "-w", ws, "--store-url", store_url, "--archive-dir",
        str(archive_dir), "--now", "2026-06-01T00:00:00Z", "--json"])
    assert now < "2026-06-01"
    assert await args.func(args) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["workspaces"][0]["runsDeleted"] == 1
    assert await store.get_run(ws, ref.RUN_ID) is None
    # explain --archive reads it from warm storage
    args = run_cli(explain_cli.register, ["explain", ref.RUN_ID, "-w", ws, "--show-prompts",
                                      "--json", "--archive", str(archive_dir)])
    assert await args.func(args) == 0
    from_archive = json.loads(capsys.readouterr().out)
    assert from_archive["source"].startswith("archive ")
    expected = json.loads(json.dumps(before.to_json()))
    assert from_archive["nodes"] == expected["nodes"]
    assert from_archive["run"] == expected["run"]
    # verify, list and restore through the CLI
    args = run_cli(archive_cli.register, ["archive", "verify", "--archive-dir", str(archive_dir)])
    assert await args.func(args) == 0
    assert f"{ws}: OK  1 segments" in capsys.readouterr().out
    args = run_cli(archive_cli.register, ["archive", "list", "--archive-dir", str(archive_dir),
                                  "--json"])
    assert await args.func(args) == 0
    listed = json.loads(capsys.readouterr().out)["segments"]
    assert [(m["workspace"], m["seq"], m["period"]) for m in listed] == [(ws, 1, "2026-02")]
    args = run_cli(archive_cli.register, ["archive", "restore", "--archive-dir", str(archive_dir),
                                  "-w", ws, "--segment", "1", "--store-url", store_url])
    assert await args.func(args) == 0
    assert "restored 1 runs (4 node traces)" in capsys.readouterr().out
    after = await explain.explain_run(store, ws, ref.RUN_ID, show_prompts=True)
    assert after is not None
    assert after.to_json() == before.to_json()


async def test_restore_replace_brings_back_stripped_prompts(store: Store, tmp_path: Path) -> None:
    """A run whose prompts were stripped in hot storage comes back whole with --replace."""
    ws = workspace_name()
    await write_events(store, ref.reference_events(ws))
    before = await explain.explain_run(store, ws, ref.RUN_ID, show_prompts=True)
    assert before is not None
    archive = arc.Archive.at(tmp_path / "a")
    policy = retention.Policy(hot=retention.HotDays(run_summaries=400, node_traces=200,
                                                    prompts=30, error_details=400))
    assert before.completed_at is not None
    now = before.completed_at + timedelta(days=31)
    await retention.run_retention(store, policy, now=now, archive=archive, apply=True,
                                  workspaces=[ws])
    stripped = await store.get_nodes(ws, ref.RUN_ID)
    assert all("input" not in n and "output" not in n for n in stripped)
    assert [n["nodeId"] for n in stripped] == ["source", "classify", "route", "update-crm"]
    await arc.restore(store, archive, ws, run_ids=[ref.RUN_ID])
    merged = await store.get_nodes(ws, ref.RUN_ID)
    assert all("input" not in n for n in merged)  # the idempotent merge keeps the hot copy
    await arc.restore(store, archive, ws, run_ids=[ref.RUN_ID], replace=True)
    after = await explain.explain_run(store, ws, ref.RUN_ID, show_prompts=True)
    assert after is not None
    assert after.to_json() == before.to_json()


async def test_restore_refuses_a_tampered_archive(store: Store, store_url: str,
                                                  tmp_path: Path) -> None:
    """archive restore checks the chain first and refuses a segment that does not verify."""
    ws = workspace_name()
    archive = arc.Archive.at(tmp_path)
    write_segment(archive, ws, "2026-03", sample_docs(ws, runs=2))
    seg = next((tmp_path / ws).glob("*.jsonl.gz"))
    seg.write_bytes(seg.read_bytes()[:-3] + b"xyz")
    args = run_cli(archive_cli.register, ["archive", "restore", "--archive-dir", str(tmp_path),
                                  "-w", ws, "--segment", "1", "--store-url", store_url])
    with pytest.raises(ArchiveError, match="does not verify"):
        await args.func(args)
    assert await store.workspaces() == []  # nothing of the segment was restored


# -- S3-compatible bucket (moto's in-process S3: no network) ---------------------------------

@pytest.fixture
def s3_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[arc.Archive]:
    moto = pytest.importorskip("moto", reason="pip install -e '.[dev]' brings moto")
    import boto3  # type: ignore[import-untyped]  # boto3 ships no type hints

    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AUDIT_ARCHIVE_SCRATCH", str(tmp_path / "scratch"))
    with moto.mock_aws():
        boto3.client("s3").create_bucket(Bucket="audit-archive")
        yield arc.Archive.at("s3://audit-archive/prod")


def test_s3_archive_round_trips_and_detects_tampering(s3_archive: arc.Archive) -> None:
    """Segments in a bucket verify, read back, and a changed byte or removed one is found."""
    archive = s3_archive
    blobs = archive.blobs
    assert isinstance(blobs, S3BlobStore)
    records = sample_docs("wss", runs=6)
    for i in range(3):
        write_segment(archive, "wss", f"2026-0{i + 1}", records[i * 8:(i + 1) * 8])
    assert archive.workspaces() == ["wss"]
    assert [r for _, k, d in archive.records("wss") for r in [(k, d)]] == records[:24]
    assert archive.verify("wss").ok
    key = "wss/00000002-2026-02.jsonl.gz"
    data = bytearray(blobs.get_bytes(key))
    data[10] ^= 0xFF
    blobs.put_bytes(key, bytes(data))
    assert archive.verify("wss").problems == ["segment 2: content changed (SHA-256 mismatch)"]
    blobs.delete(key)
    blobs.delete("wss/00000002-2026-02.manifest.json")
    problems = archive.verify("wss").problems
    assert "segment 2: manifest missing (segment removed?)" in problems
    assert any("segment 3: chain broken" in p for p in problems)


async def test_s3_archive_retention_restore_and_explain(store: Store,
                                                        s3_archive: arc.Archive) -> None:
    """Retention archives into the bucket; explain reads it; restore brings the run back."""
    ws = workspace_name()
    await write_events(store, ref.reference_events(ws))
    before = await explain.explain_run(store, ws, ref.RUN_ID, show_prompts=True)
    assert before is not None
    assert before.completed_at is not None
    now = before.completed_at + timedelta(days=91)
    await retention.run_retention(store, retention.Policy(), now=now, archive=s3_archive,
                                  apply=True, workspaces=[ws])
    assert await store.get_run(ws, ref.RUN_ID) is None
    assert s3_archive.verify(ws).ok
    found = await arc.read_run(s3_archive, ws, ref.RUN_ID)
    assert found is not None
    assert explain.build(ws, ref.RUN_ID, found[0], found[1],
                         show_prompts=True).to_json()["nodes"] == before.to_json()["nodes"]
    await arc.restore(store, s3_archive, ws, segments=[1])
    after = await explain.explain_run(store, ws, ref.RUN_ID, show_prompts=True)
    assert after is not None
    assert after.to_json() == before.to_json()


async def test_restore_refuses_a_segment_holding_another_workspaces_documents(
    store: Store, store_url: str, tmp_path: Path
) -> None:
    """A segment of A whose hashes were recomputed around B's documents is refused by
    restore (nothing written to A or B) and reported by verify."""
    ws_a, ws_b = workspace_name("a"), workspace_name("b")
    archive = arc.Archive.at(tmp_path)
    first = write_segment(archive, ws_a, "2026-03", sample_docs(ws_a, runs=2))
    theirs = write_segment(archive, ws_b, "2026-04", sample_docs(ws_b, runs=2))
    # B's segment copied into A's chain as its second link, every hash recomputed.
    name = "00000002-2026-04"
    (tmp_path / ws_a / f"{name}.jsonl.gz").write_bytes(
        (tmp_path / ws_b / theirs["segment"]).read_bytes())
    forged = {**theirs, "workspace": ws_a, "seq": 2, "segment": f"{name}.jsonl.gz",
              "prevChainHash": first["chainHash"]}
    forged["chainHash"] = arc.chain_hash(forged)
    (tmp_path / ws_a / f"{name}.manifest.json").write_text(arc.canonical(forged))
    head = json.loads((tmp_path / ws_a / "HEAD.json").read_text())
    (tmp_path / ws_a / "HEAD.json").write_text(
        arc.canonical({**head, "seq": 2, "chainHash": forged["chainHash"]}))
    report = archive.verify(ws_a)
    assert not report.ok
    assert len(report.problems) == 1
    assert report.problems[0].startswith("segment 2: segment 00000002-2026-04.jsonl.gz holds a ")
    assert f"of workspace {ws_b!r}" in report.problems[0]
    assert archive.verify(ws_a).to_json()["ok"] is False
    for argv in (["--segment", "2"], ["--segment", "1", "--segment", "2"]):
        args = run_cli(archive_cli.register, ["archive", "restore", "--archive-dir",
                                              str(tmp_path), "-w", ws_a, *argv,
                                              "--store-url", store_url])
        with pytest.raises(ArchiveError):
            await args.func(args)
    with pytest.raises(ArchiveError, match=f"not of workspace {ws_a!r}"):
        await arc.restore(store, archive, ws_a, segments=[2])
    assert await store.workspaces() == []  # neither A nor B received anything
    assert archive.verify(ws_b).ok


def test_verify_reports_a_manifest_naming_another_workspace(tmp_path: Path) -> None:
    """A segment copied whole (manifest and all) from B's folder into A's is reported."""
    ws_a, ws_b = workspace_name("a"), workspace_name("b")
    archive = arc.Archive.at(tmp_path)
    manifest = write_segment(archive, ws_b, "2026-03", sample_docs(ws_b, runs=1))
    problem = arc.foreign_document(ws_a, manifest, [])
    assert problem == (f"segment {manifest['segment']} names workspace {ws_b!r} "
                       f"but lies in workspace {ws_a!r}")
    assert arc.foreign_document(ws_b, manifest, archive.read_segment(ws_b, manifest)) is None

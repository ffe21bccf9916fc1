"""Redaction before storage: detectors, field paths, determinism, and the worker step."""

from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings

from tests.helpers import MemoryStore, dlq_entries
from tests.reference import decoded
from tests.store_conformance import Scenario, order_key, scenarios
from worker.constants import Reason
from worker.consumer import Worker
from worker.documents import coalesce, fold
from worker.emitter import AuditEmitter, make_event
from worker.errors import ConfigError
from worker.metrics import Metrics
from worker.redaction import DETECTORS, Redactor, iban_ok, luhn_ok
from worker.settings import Settings
from worker.stores import migrate
from worker.stores.sqlite import SQLiteStore

ALL = Redactor.build(DETECTORS)
assert ALL is not None


def text(value: str) -> tuple[str, dict[str, int]]:
    counts: dict[str, int] = {}
    assert ALL is not None
    return ALL.text(value, counts), counts


@pytest.mark.parametrize(("raw", "want", "counts"), [
    ("write to lead@example.com today", "write to [email] today", {"email": 1}),
    ("a.b+c@mail.example.co.uk, x@y.io", "[email], [email]", {"email": 2}),
    ("call +44 20 7946 0958", "call [phone]", {"phone": 1}),
    ("(030) 1234-5678 or 555-123-4567", "[phone] or [phone]", {"phone": 2}),
    ("card 4111 1111 1111 1111 ok", "card [card] ok", {"card": 1}),
    ("5500-0000-0000-0004", "[card]", {"card": 1}),
    ("not a card 4111 1111 1111 1112", "not a card 4111 1111 1111 1112", {}),
    ("DE89 3704 0044 0532 0130 00 paid", "[iban] paid", {"iban": 1}),
    ("GB82WEST12345698765432", "[iban]", {"iban": 1}),
    ("DE00370400440532013000", "DE00370400440532013000", {}),  # mod-97 fails
    ("at 2026-02-15T10:30:00Z", "at 2026-02-15T10:30:00Z", {}),
    ("on 2026-02-15 10:30, order 12345678, v1.2.3", "on 2026-02-15 10:30, order 12345678, v1.2.3",
     {}),
    ("host 192.168.1.10 ms 1718000000000 pi 3.14159265",
     "host 192.168.1.10 ms 1718000000000 pi 3.14159265", {}),
    ("no digits and no at sign", "no digits and no at sign", {}),
])
def test_detectors(raw: str, want: str, counts: dict[str, int]) -> None:
    """Each detector masks what it finds (checksums decide for cards and IBANs) and
    leaves dates, times, versions, addresses and plain numbers alone."""
    assert text(raw) == (want, counts)


def test_checksums() -> None:
    """Luhn and ISO 13616 mod-97 on known good and bad numbers."""
    assert luhn_ok("4111111111111111")
    assert luhn_ok("79927398713")
    assert not luhn_ok("79927398710")
    assert iban_ok("DE89 3704 0044 0532 0130 00")
    assert iban_ok("fr1420041010050500013m02606")
    assert not iban_ok("DE89 3704 0044 0532 0130 01")
    assert not iban_ok("DE89")


def snapshot() -> dict[str, Any]:
    return make_event(
        "run.snapshot", "ws1", "wf", "r1", eventId="e1", ts="2026-02-15T10:30:00Z",
        trigger={"type": "webhook", "source": "gmail",
                 "metadata": {"from": "lead@example.com", "subject": "Call +44 20 7946 0958"}},
        nodes=[{"nodeId": "classify", "type": "ai", "model": "m-4111111111111111",
                "input": {"prompt": "Mail lead@example.com", "context": {"iban": "x"}},
                "output": {"reply": "ok", "items": [{"email": "a@b.co"}, {"email": "c@d.co"}]}},
               {"nodeId": "route", "type": "conditional", "result": "fast-track"}],
        status="completed")


def test_field_paths_and_identity_fields() -> None:
    """Paths drop or mask at the top level or in every node, with * for any key or
    element; identity fields are never changed, and cannot be configured."""
    redactor = Redactor.build(["email", "card"], drop=["node.input.context", "trigger.metadata"],
                              mask=["node.output.items.*.email", "node.missing"])
    assert redactor is not None
    (d,) = decoded([snapshot()])
    counts: dict[str, int] = {}
    redactor.event(d.doc, counts)
    assert d.doc["trigger"] == {"type": "webhook", "source": "gmail"}
    classify, route = d.doc["nodes"]
    assert classify["input"] == {"prompt": "Mail [email]"}
    assert classify["output"]["items"] == [{"email": "[redacted]"}, {"email": "[redacted]"}]
    assert classify["model"] == "m-4111111111111111"  # identity: untouched
    assert route == {"nodeId": "route", "type": "conditional", "result": "fast-track",
                     "attempt": 1}
    assert counts == {"drop": 2, "mask": 2, "email": 1}
    for bad in (["runId"], ["node.nodeId"], ["nodes"], ["a..b"], [" "]):
        with pytest.raises(ConfigError):
            Redactor.build(drop=bad)
    with pytest.raises(ConfigError, match="AUDIT_REDACT_DETECTORS"):
        Redactor.build(["email", "ssn"])
    assert Redactor.build() is None


def test_dead_letter_payloads() -> None:
    """JSON payloads are redacted as events; other payloads as text; clean ones unchanged."""
    assert ALL is not None
    counts: dict[str, int] = {}
    bad_event = json.dumps({"v": 1, "type": "run.started", "note": "lead@example.com"}).encode()
    assert json.loads(ALL.payload(bad_event, counts)) == {"v": 1, "type": "run.started",
                                                          "note": "[email]"}
    assert ALL.payload(b"{broken lead@example.com \xff", counts) == b"{broken [email] \xff"
    clean = b'{"v": 1,  "x": "nothing here"}'
    assert ALL.payload(clean, counts) is clean
    assert counts == {"email": 2}


def test_settings_from_env() -> None:
    """AUDIT_REDACT_* configure redaction; it is off by default; bad values fail at start."""
    assert Settings(metrics_port=0).redactor() is None
    s = Settings.from_env({"AUDIT_REDACT_DETECTORS": "email, iban",
                           "AUDIT_REDACT_DROP": "node.input.context",
                           "AUDIT_REDACT_MASK": "trigger.metadata.from"})
    redactor = s.redactor()
    assert redactor is not None
    assert redactor.detectors == ("email", "iban")
    assert redactor.drop == (("node", "input", "context"),)
    with pytest.raises(ConfigError):
        Settings.from_env({"AUDIT_REDACT_DETECTORS": "names"})


# -- determinism: the idempotence property with redaction on ---------------------------------

PII = ("lead@example.com", "+44 20 7946 0958", "4111 1111 1111 1111", "DE89 3704 0044 0532 0130 00")


def with_pii(raw_events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The scenario's events with personal data in prompts, outputs and run extras."""
    def secret(*key: Any) -> str:  # the same for every copy of a run or a node execution
        return PII[zlib.crc32(repr(key).encode()) % len(PII)]

    out = []
    for raw in raw_events:
        raw = copy.deepcopy(raw)
        run = (raw["workspaceId"], raw["runId"])
        raw["note"] = f"contact {secret(run)}"
        for node in ([raw["node"]] if "node" in raw else []) + raw.get("nodes", []):
            node["input"] = {"prompt": f"Reply to {secret(run, node['nodeId'], node['attempt'])}",
                             "was": node.get("input")}
        out.append(raw)
    return out


def redacted(raw_events: list[dict[str, Any]]) -> list[Any]:
    """Events as a redacting worker hands them to the store: decoded fresh each time."""
    assert ALL is not None
    out = decoded(raw_events)
    for d in out:
        ALL.event(d.doc, {})
    return out


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(scenario=scenarios())
def test_idempotence_property_with_redaction(scenario: Scenario) -> None:
    """Any multiset of events, redacted on every delivery, in any order and batches,
    stores exactly fold(redacted events) on SQLite, the same for both orders."""
    events = with_pii(scenario.events)

    async def stored(batches: list[list[int]]) -> Any:
        store = SQLiteStore("sqlite:///:memory:")
        await store.open()
        await migrate(store)
        try:
            for batch in batches:
                items = list(enumerate(redacted([events[j] for j in batch])))
                assert (await store.write(coalesce(items))).rejected == ()
            written = [events[i] for i in scenario.written()]
            runs, nodes = fold(redacted(written))
            for (ws, run_id), want in runs.items():
                got = await store.get_run(ws, run_id)
                assert got == want
                got_nodes = await store.get_nodes(ws, run_id)
                assert got_nodes == sorted((doc for key, doc in nodes.items()
                                            if key[:2] == (ws, run_id)), key=order_key)
                shown = json.dumps([got, got_nodes], default=str, ensure_ascii=False)
                assert not [pii for pii in PII if pii in shown]
            return runs, sorted(nodes.items())
        finally:
            await store.close()

    first = anyio.run(stored, scenario.first)
    second = anyio.run(stored, scenario.second)
    assert first == second


# -- the worker, on real Redis ---------------------------------------------------------------

@pytest.mark.anyio
@pytest.mark.redis
async def test_worker_redacts_before_storage_and_in_dead_letters(
    redis_client: aioredis.Redis, stream: str, redis_url: str, tmp_path: Path
) -> None:
    """Stored documents and dead-letter payloads are redacted; the same event delivered
    twice stores the same document; the counter counts each finding, from 0."""
    emitter = AuditEmitter(redis_client, [stream])
    event = snapshot()
    await emitter.emit(event)
    await emitter.emit(event)  # a duplicate: merges to the same documents
    await emitter.emit_raw(stream, json.dumps({"v": 1, "note": "card 4111111111111111"}).encode())
    settings_ = Settings(redis_url=redis_url, streams=(stream,), metrics_port=0, block_ms=50,
                         burst=True, consumer="w1", claim_idle_ms=200, reclaim_interval_s=0.1,
                         redact_detectors=("email", "phone", "card", "iban"),
                         redact_mask=("trigger.metadata.from",))
    metrics = Metrics()
    assert metrics.registry.get_sample_value("audit_fleet_redactions_total",
                                             {"detector": "iban"}) == 0
    store = MemoryStore()
    with anyio.fail_after(30):
        await Worker(settings_, store, redis_client, metrics).run()
    run = await store.get_run("ws1", "r1")
    assert run is not None
    assert run["trigger"]["metadata"] == {"from": "[redacted]", "subject": "Call [phone]"}
    nodes = await store.get_nodes("ws1", "r1")
    assert nodes[0]["input"]["prompt"] == "Mail [email]"
    assert nodes[0]["output"]["items"] == [{"email": "[email]"}, {"email": "[email]"}]
    (dead,) = await dlq_entries(redis_client, stream)
    assert dead["reason"] == Reason.SCHEMA
    assert json.loads(dead["event"]) == {"v": 1, "note": "card [card]"}

    def count(detector: str) -> float | None:
        return metrics.registry.get_sample_value("audit_fleet_redactions_total",
                                                 {"detector": detector})

    # per delivery of the snapshot: 3 emails, 1 phone, 1 masked field; the dead letter: 1 card
    assert (count("email"), count("phone"), count("mask"), count("card"), count("iban"),
            count("drop")) == (6, 2, 2, 1, 0, 0)

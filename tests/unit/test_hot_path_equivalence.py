"""The lean hot path (``worker.intake`` + ``documents.Coalescer``) against the decode and
coalesce it replaced (``tests/oracle.py``): identical documents, write batches and
dead-letter verdicts (reason and message) over the harness's load mix, a seeded corpus of
mutated events (every rule broken, unknown fields, duplicate keys, odd characters), the
hostile-input catalogue and hypothesis-generated runs."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks import load
from tests import oracle
from tests.catalogue import CASES
from tests.reference import SIGNED_WITH
from tests.store_conformance import run_events
from worker import events as ev
from worker.deadletter import DeadLetter
from worker.documents import WriteBatch, coalesce_each, coalesce_records
from worker.redisio import Entry
from worker.writer import prepare

MAX_BYTES = 512 * 1024
_encode = msgspec.json.Encoder(order="sorted").encode


def canonical(value: Any) -> bytes:
    """Type-exact and key-order-free: 1, 1.0 and true differ; datetimes keep their zone."""
    return _encode(value)


def verdicts(dead: Sequence[DeadLetter]) -> list[tuple[str, str, str]]:
    return [(d.source_id, d.reason, d.error) for d in dead]


def batch_view(batch: WriteBatch) -> tuple[list[Any], list[Any]]:
    runs = [(k, canonical(r.to_doc()), r.sources, canonical(r.extra))
            for k, r in batch.runs.items()]
    nodes = [(k, canonical(n.doc), n.sources) for k, n in batch.nodes.items()]
    return runs, nodes


def assert_same(entries: list[Entry]) -> None:
    """Old and new give the same verdicts, documents and write batch for one batch."""
    old_valid, old_dead = oracle.prepare(entries, MAX_BYTES, 5)
    new_valid, new_dead = prepare(entries, MAX_BYTES, 5)
    assert verdicts(new_dead) == verdicts(old_dead)
    assert [(s, canonical(d)) for s, d, _ in new_valid] == \
        [(s, canonical(d.doc)) for s, d in old_valid]
    old_batch = oracle.coalesce(old_valid)
    new_batch, failed = coalesce_each(new_valid)
    assert failed == {}
    assert batch_view(new_batch) == batch_view(old_batch)
    assert batch_view(coalesce_records(new_valid)) == batch_view(old_batch)


def entries_of(payloads: Sequence[bytes]) -> list[Entry]:
    return [Entry("s", f"{i + 1}-0", p) for i, p in enumerate(payloads)]


# -- a seeded corpus of mutated events ------------------------------------------------------

#: Strings that sit on every edge of the identifier rules.
ODD_TEXT = [
    "", "a", "x" * 48, "x" * 49, "x" * 64, "x" * 65, "x" * 200, "x" * 201, "ok\n", "\nok",
    "a\rb", "tab\t", "nul\x00", "del\x7f", "c1\x85", "nbsp\xa0", "zwj\u200d", "lrm\u200e",
    "alm\u061c", "ls\u2028", "ps\u2029", "rlo\u202e", "lri\u2066", "pdi\u2069", "emoji😀",
    "東京", "é", "a.b", "a-b_c", "$where", "../x", " space ", "\ufeffbom", "priv\ue000",
    "unassigned\u0378", "soft\u00ad", "Catalogue", "running", "completed", "failed",
]
ODD_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 1.0, 1.5, -0.0, 2**63 - 1, 2**63, -(2**63), 10**30, "",
    "1", [], {}, [1], {"a": 1}, "2026-02-15T10:30:00Z", "2026-02-15T10:30:00+0200",
    "0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00", "2026-02-15T10:30:00",
    1_000_000, 1_000_001,
]
TOP_FIELDS = ["v", "eventId", "workspaceId", "workflowId", "runId", "ts", "type", "status",
              "totalDuration", "error", "startedAt", "completedAt", "trigger", "subjects",
              "nodes", "node"]
NODE_FIELDS = ["nodeId", "type", "startedAt", "completedAt", "attempt", "input", "output",
               "model", "tokens_used", "evaluation", "result", "skippedBranches", "actions",
               "error", "status"]
KINDS = [ev.RUN_STARTED, ev.NODE_COMPLETED, ev.NODE_FAILED, ev.RUN_COMPLETED, ev.RUN_FAILED,
         ev.RUN_SNAPSHOT, "run.unknown"]


def _odd(rng: random.Random) -> Any:
    return rng.choice(ODD_TEXT) if rng.random() < 0.5 else rng.choice(ODD_VALUES)


def _mutate_node(rng: random.Random, node: dict[str, Any]) -> None:
    what = rng.randrange(9)
    if what == 0:
        node.pop(rng.choice(NODE_FIELDS), None)
    elif what == 1:
        node[rng.choice(NODE_FIELDS)] = _odd(rng)
    elif what == 2:
        node["x-unknown"] = _odd(rng)
    elif what == 3:
        node["tokens_used"] = {rng.choice(["input", "output", "other"]): _odd(rng)}
    elif what == 4:
        node["error"] = rng.choice([None, {}, {"message": _odd(rng)}, {"type": _odd(rng)},
                                    {"retries": _odd(rng)}, {"extra": 1}, "boom"])
    elif what == 5:
        node["actions"] = rng.choice([[], ["a"], [{"type": "x"}], [1], "a", None,
                                      [{"system": "s", "operation": "o"}]])
    elif what == 6:
        node["status"] = rng.choice(ODD_TEXT)
    elif what == 7:
        node["skippedBranches"] = rng.choice([[], ["b"], [1], None, "b"])
    else:
        node[rng.choice(["startedAt", "completedAt"])] = rng.choice(
            ["2026-02-15T10:30:00+05:00", "2026-02-15T10:30:00.123456Z", None,
             "0001-01-01T00:00:00Z", "2026-02-15 10:30:00z"])


def mutate(rng: random.Random, raw: dict[str, Any]) -> bytes:
    """One event made wrong (or odd but right) in one or two ways, encoded."""
    for _ in range(rng.randint(1, 2)):
        what = rng.randrange(10)
        if what == 0:
            raw.pop(rng.choice(TOP_FIELDS), None)
        elif what == 1:
            raw[rng.choice(TOP_FIELDS)] = _odd(rng)
        elif what == 2:
            raw["x-unknown"] = _odd(rng)
        elif what == 3:
            raw["type"] = rng.choice(KINDS)
        elif what == 4 and isinstance(raw.get("node"), dict):
            _mutate_node(rng, raw["node"])
        elif what == 5 and isinstance(raw.get("nodes"), list) and raw["nodes"]:
            _mutate_node(rng, rng.choice(raw["nodes"]))
        elif what == 6:
            raw["trigger"] = rng.choice([None, {}, {"type": _odd(rng)}, {"metadata": _odd(rng)},
                                         {"source": "s", "other": 1}, "webhook"])
        elif what == 7:
            raw["subjects"] = rng.choice([[], ["email:a@b"], [""], ["x" * 321], "a", [1],
                                          ["s"] * 101, None])
        elif what == 8:
            raw["totalDuration"] = rng.choice([0, 5, 5.5, -1, -0.5, None, "5", True, 2**63])
        else:
            raw["status"] = rng.choice(ODD_TEXT)
    data = msgspec.json.encode(raw)
    if rng.random() < 0.1:  # a duplicate key: the last one counts
        name = rng.choice(["runId", "workspaceId", "eventId", "v", "type", "ts"])
        value = msgspec.json.encode(_odd(rng) if rng.random() < 0.5 else raw.get(name))
        data = data[:-1] + b',"' + name.encode() + b'":' + value + b"}"
    return data


@pytest.fixture(scope="module")
def load_mix() -> list[bytes]:
    pool = load.build_templates(7, 60)
    ids = load.Ids("eq", 0, "eq_ws")
    return [ids.payload(item) for item in load.plan(pool, 6_000, seed=7)]


def test_the_load_mix_gives_the_same_documents(load_mix: list[bytes]) -> None:
    """The harness's load mix (poison included), in batches of 500: identical."""
    for i in range(0, len(load_mix), 500):
        assert_same(entries_of(load_mix[i:i + 500]))


def test_mutated_events_give_the_same_verdicts_and_documents(load_mix: list[bytes]) -> None:
    """20,000 seeded mutations of load-mix events, each batch mixed with intact ones."""
    rng = random.Random(20261201)
    decoded = [msgspec.json.decode(p) for p in load_mix[:2_000]]
    for _ in range(40):
        batch = []
        for _ in range(500):
            raw = msgspec.json.decode(msgspec.json.encode(rng.choice(decoded)))
            batch.append(mutate(rng, raw) if rng.random() < 0.8 else msgspec.json.encode(raw))
        assert_same(entries_of(batch))


def test_random_identifier_characters_are_judged_alike() -> None:
    """Every character class in every identifier field: the same verdict either way."""
    rng = random.Random(5)
    base = {"v": 1, "eventId": "e", "type": ev.NODE_COMPLETED, "workspaceId": "ws",
            "workflowId": "wf", "runId": "r", "ts": "2026-02-15T10:30:00Z",
            "node": {"nodeId": "n", "type": "ai"}}
    payloads = []
    for _ in range(3_000):
        raw = msgspec.json.decode(msgspec.json.encode(base))
        text = "".join(chr(rng.choice([rng.randrange(0x20, 0x7f), rng.randrange(0, 0x300),
                                       rng.randrange(0x2000, 0x2100), rng.randrange(0x110000)]))
                       for _ in range(rng.randint(0, 4)))
        text = text.encode("utf-8", "replace").decode("utf-8", "replace")
        field = rng.choice(["eventId", "workspaceId", "workflowId", "runId", "nodeId", "type"])
        if field in ("nodeId", "type"):
            raw["node"][field] = text
        else:
            raw[field] = text
        payloads.append(msgspec.json.encode(raw))
    for i in range(0, len(payloads), 500):
        assert_same(entries_of(payloads[i:i + 500]))


def test_the_hostile_input_catalogue_gives_the_same_verdicts() -> None:
    """Every case of tests/integration/test_catalogue.py, between valid neighbours."""
    entries: list[Entry] = []
    for case in CASES:
        for fields in case.entries:
            events = [v for k, v in fields if k == "event"]
            sig = next((v for k, v in fields if k == "sig"), None)
            entries.append(Entry("s", f"{len(entries) + 1}-0", events[0] if events else None,
                                 extra_payloads=tuple(events[1:]), sig=sig))
    assert_same(entries)
    assert len({(d.reason) for d in prepare(entries, MAX_BYTES, 5)[1]}) > 3


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(("A", "B")), st.sampled_from(("r1", "r-ß"))),
                min_size=1, max_size=3, unique=True).flatmap(
    lambda keys: st.tuples(*[run_events(label, run) for label, run in keys])),
    st.randoms(use_true_random=False))
def test_generated_runs_coalesce_alike(runs: tuple[list[dict[str, Any]], ...],
                                       rng: random.Random) -> None:
    """Consistent runs from the store conformance strategy, shuffled and replayed."""
    raw_events = [{k: v for k, v in e.items() if k != SIGNED_WITH} for r in runs for e in r]
    payloads = [ev.encode(e) for e in raw_events] * rng.randint(1, 2)
    rng.shuffle(payloads)
    assert_same(entries_of(payloads))


def test_signed_events_carry_their_key_alike() -> None:
    """A key id on the record ends on the node documents and the run's signedBy."""
    from tests.reference import decoded, reference_events, reference_snapshot

    raws = [e | {SIGNED_WITH: "k1"} for e in reference_events()] + [reference_snapshot()]
    old = oracle.coalesce(list(enumerate(decoded(raws))))
    new = coalesce_records([(i, d.doc, d.key_id) for i, d in enumerate(decoded(raws))])
    assert batch_view(new) == batch_view(old)
    assert any(r.signed_by for r in new.runs.values())

"""The load generator: realistic lead-triage events, interleaved like a busy engine.

Events come from :mod:`worker.samples` (source → classify (ai) → route (conditional) →
update-crm (action), with model timeouts retried and CRM failures), so the mix of
node types, the long-tailed prompt sizes (log-normal, capped at 256 KiB) and the
failures are the design's. A share of runs is sent the design's other way, as one
``run.snapshot``; a small share of entries are poison (an unsupported ``v``), which
the fleet must dead-letter, so lost/duplicate accounting covers the dead-letter path.

Generating and validating a 3 KiB event costs far more than sending it, so a pool of
*run templates* is built once (each event encoded and validated against the v1
contract with the same code the producer SDK uses) with placeholders for the
workspace, run and event IDs. A producer fills the placeholders with fresh IDs
(a bytes join, about a microsecond) and can therefore saturate the fleet from one
process. Runs are interleaved: ``concurrency`` runs are in progress at once and each
next event belongs to a random one of them, as when many workflows run in parallel.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from worker import events as ev
from worker import samples
from worker.emitter import make_event

#: Placeholders filled per emitted event. Valid IDs, and they cannot occur in the
#: generated text (prompts are made of plain words).
PH_WORKSPACE = "WSPLACEHOLDERxxxxxxxxxxxxxxxxx"
PH_RUN = "run~PLACEHOLDER~"
PH_EVENT = "evt~PLACEHOLDER~"
_SLOTS = {PH_WORKSPACE.encode(): 0, PH_RUN.encode(): 1, PH_EVENT.encode(): 2}
_SPLIT = re.compile(b"(" + b"|".join(re.escape(k) for k in _SLOTS) + b")")

#: Where an emitted event must end up: in its run document's ``eventIds`` (RUN), as a
#: node document's ``eventId`` (NODE), both (SNAPSHOT: the run's ``eventIds`` and every
#: node of the snapshot), or in the dead-letter stream (POISON).
RUN, NODE, SNAPSHOT, POISON = "R", "N", "S", "P"

MAX_PROMPT = 256 * 1024


def prompt_sizer(spec: str) -> Callable[[random.Random], int]:
    """``default`` (log-normal long tail up to 256 KiB), ``small`` (200 chars) or N chars."""
    if spec == "default":
        return samples.default_prompt_size
    size = 200 if spec == "small" else int(spec)
    if not 1 <= size <= MAX_PROMPT:
        raise ValueError(f"prompt size must be 1..{MAX_PROMPT}, got {size}")
    return lambda rng: size


@dataclass(frozen=True, slots=True)
class Template:
    """One encoded, validated event with ID placeholders."""

    kind: str
    type: str
    node_type: str | None
    nodes: int
    parts: tuple[bytes, ...]
    slots: tuple[int, ...]

    @classmethod
    def from_payload(cls, kind: str, type: str, node_type: str | None, nodes: int,
                     payload: bytes) -> Template:
        pieces = _SPLIT.split(payload)
        parts = tuple(pieces[0::2])
        slots = tuple(_SLOTS[p] for p in pieces[1::2])
        if sorted(slots) != [0, 1, 2]:
            raise ValueError("a template must hold each ID placeholder exactly once")
        return cls(kind, type, node_type, nodes, parts, slots)

    @property
    def size(self) -> int:
        """Payload bytes once filled with IDs of about the placeholders' length."""
        return sum(len(p) for p in self.parts) + len(PH_WORKSPACE) + len(PH_RUN) + len(PH_EVENT)

    def fill(self, workspace: bytes, run_id: bytes, event_id: bytes) -> bytes:
        values = (workspace, run_id, event_id)
        out = [self.parts[0]]
        for slot, part in zip(self.slots, self.parts[1:], strict=True):
            out.append(values[slot])
            out.append(part)
        return b"".join(out)

    def to_json(self) -> dict[str, Any]:
        payload = self.fill(PH_WORKSPACE.encode(), PH_RUN.encode(), PH_EVENT.encode())
        return {"kind": self.kind, "type": self.type, "node_type": self.node_type,
                "nodes": self.nodes, "payload": payload.decode()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Template:
        return cls.from_payload(data["kind"], data["type"], data["node_type"], data["nodes"],
                                data["payload"].encode())


RunTemplate = tuple[Template, ...]


def _encode_checked(event: dict[str, Any]) -> bytes:
    payload = ev.encode(event)
    ev.decode(payload, max_bytes=16 * 1024 * 1024)  # the producer SDK's own validation
    return payload


@dataclass(frozen=True, slots=True)
class Pool:
    """Run templates: ``runs`` drawn from the design's distribution, and ``tail`` runs
    whose prompts sit at the far end of it (64 KiB up to the 256 KiB cap)."""

    runs: tuple[RunTemplate, ...]
    tail: tuple[RunTemplate, ...] = ()


def _run_templates(rng: random.Random, sizer: Callable[[random.Random], int],
                   snapshot_share: float) -> RunTemplate:
    run = samples.lead_triage_run(rng, PH_WORKSPACE, PH_RUN, prompt_size=sizer)
    snapshot = rng.random() < snapshot_share
    templates: list[Template] = []
    for event in samples.run_events(run, snapshot=snapshot):
        event["eventId"] = PH_EVENT
        payload = _encode_checked(event)
        if event["type"] == ev.RUN_SNAPSHOT:
            templates.append(Template.from_payload(SNAPSHOT, event["type"], None,
                                                   len(event["nodes"]), payload))
        elif "node" in event:
            templates.append(Template.from_payload(NODE, event["type"],
                                                   event["node"]["type"], 1, payload))
        else:
            templates.append(Template.from_payload(RUN, event["type"], None, 0, payload))
    return tuple(templates)


def _fixed(size: int) -> Callable[[random.Random], int]:
    return lambda _rng: size


def build_templates(
    seed: int, runs: int, *, prompt_size: str = "default", snapshot_share: float = 0.25,
    tail: int = 8,
) -> Pool:
    """``runs`` run templates (events in emission order), deterministic for ``seed``.

    The log-normal puts a prompt above 64 KiB once in ~4,000 runs and at the 256 KiB
    cap almost never, so a pool of a few hundred runs would not hold one. ``tail``
    extra runs (with the ``default`` sizes only) have prompts spaced geometrically
    from 64 KiB to exactly 256 KiB; :func:`plan` starts one of them with probability
    ``tail_share``, so every benchmark exercises the cap.
    """
    rng = random.Random(seed)
    sizer = prompt_sizer(prompt_size)
    normal = tuple(_run_templates(rng, sizer, snapshot_share) for _ in range(runs))
    extremes: list[RunTemplate] = []
    if prompt_size == "default":
        for i in range(tail):
            size = min(MAX_PROMPT, int(64 * 1024 * 4 ** (i / max(1, tail - 1))))
            extremes.append(_run_templates(rng, _fixed(size), snapshot_share))
    return Pool(normal, tuple(extremes))


def poison_template() -> Template:
    """An entry the fleet must dead-letter (an event version it does not read)."""
    event = make_event("run.started", PH_WORKSPACE, "wf_lead_triage", PH_RUN,
                       eventId=PH_EVENT, trigger={"type": "webhook", "source": "gmail"})
    event["v"] = 2
    return Template.from_payload(POISON, "run.started", None, 0, ev.encode(event))


def save_templates(path: Path, pool: Pool) -> None:
    data = {"runs": [[t.to_json() for t in run] for run in pool.runs],
            "tail": [[t.to_json() for t in run] for run in pool.tail]}
    path.write_bytes(msgspec.json.encode(data))


def load_templates(path: Path) -> Pool:
    data = msgspec.json.decode(path.read_bytes())
    return Pool(tuple(tuple(Template.from_json(t) for t in run) for run in data["runs"]),
                tuple(tuple(Template.from_json(t) for t in run) for run in data["tail"]))


@dataclass(frozen=True, slots=True)
class Planned:
    """One event to emit: which template, for which run, with which sequence number."""

    template: Template
    run_no: int
    seq: int


def plan(
    pool: Pool,
    events: int,
    *,
    seed: int,
    concurrency: int = 200,
    poison: float = 0.0,
    tail_share: float = 0.002,
) -> Iterator[Planned]:
    """The emission order: ``concurrency`` runs in progress, each event from a random one.

    Each run's own events stay in order. Runs still in progress when ``events`` is
    reached are left unfinished (as they would be at any instant in production).
    A new run is a tail run with probability ``tail_share`` (when the pool has any);
    an entry is poison with probability ``poison``.
    """
    if not pool.runs:
        raise ValueError("no templates")
    rng = random.Random(seed)
    bad = poison_template() if poison > 0 else None
    active: list[tuple[RunTemplate, int, list[int]]] = []  # template, run number, [position]
    next_run = 0

    def start() -> tuple[RunTemplate, int, list[int]]:
        nonlocal next_run
        if pool.tail and rng.random() < tail_share:
            run = pool.tail[rng.randrange(len(pool.tail))]
        else:
            run = pool.runs[next_run % len(pool.runs)]
        next_run += 1
        return (run, next_run - 1, [0])

    for _ in range(max(1, concurrency)):
        active.append(start())
    for seq in range(events):
        if bad is not None and rng.random() < poison:
            yield Planned(bad, next_run, seq)
            next_run += 1
            continue
        i = rng.randrange(len(active))
        run, run_no, pos = active[i]
        yield Planned(run[pos[0]], run_no, seq)
        pos[0] += 1
        if pos[0] >= len(run):
            active[i] = start()


@dataclass(frozen=True, slots=True)
class Ids:
    """How a producer names what it emits: unique per benchmark run and producer."""

    tag: str
    producer: int
    workspace: str

    def run_id(self, run_no: int) -> str:
        return f"run-{self.tag}-{self.producer}-{run_no:07d}"

    def event_id(self, seq: int) -> str:
        return f"ev-{self.tag}-{self.producer}-{seq:09d}"

    def payload(self, item: Planned) -> bytes:
        return item.template.fill(self.workspace.encode(), self.run_id(item.run_no).encode(),
                                  self.event_id(item.seq).encode())


@dataclass(slots=True)
class MixSummary:
    """What a planned load holds (printed, stored in the results, and tested)."""

    events: int = 0
    bytes: int = 0
    max_bytes: int = 0
    by_kind: dict[str, int] | None = None
    by_event_type: dict[str, int] | None = None
    by_node_type: dict[str, int] | None = None
    failed_nodes: int = 0
    retried_nodes: int = 0
    runs: int = 0


def summarize(items: Sequence[Planned]) -> MixSummary:
    """Counts by kind, event type and node type (snapshot nodes included), and sizes."""
    s = MixSummary(by_kind={}, by_event_type={}, by_node_type={})
    assert s.by_kind is not None
    assert s.by_event_type is not None
    assert s.by_node_type is not None
    runs: set[int] = set()
    for item in items:
        t = item.template
        size = t.size
        s.events += 1
        s.bytes += size
        s.max_bytes = max(s.max_bytes, size)
        s.by_kind[t.kind] = s.by_kind.get(t.kind, 0) + 1
        s.by_event_type[t.type] = s.by_event_type.get(t.type, 0) + 1
        if t.kind != POISON:
            runs.add(item.run_no)
        for node_type, failed, retried in _nodes_of(t):
            s.by_node_type[node_type] = s.by_node_type.get(node_type, 0) + 1
            s.failed_nodes += failed
            s.retried_nodes += retried
    s.runs = len(runs)
    return s


def _nodes_of(t: Template) -> list[tuple[str, int, int]]:
    """(type, failed, retried) of each node an event carries."""
    if t.kind not in (NODE, SNAPSHOT):
        return []
    doc = msgspec.json.decode(t.fill(b"w", b"r", b"e"))
    nodes = [doc["node"]] if t.kind == NODE else doc["nodes"]
    return [(n["type"], 1 if n.get("error") else 0, 1 if int(n.get("attempt", 1)) > 1 else 0)
            for n in nodes]


def now_ms() -> float:
    return time.time() * 1000

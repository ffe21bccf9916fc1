"""Helpers shared by the SQL stores: JSON codec, time columns, row order, URL options.

Both SQL stores keep one row per run and one per node execution, with the columns the
design's queries filter on and the whole canonical document in ``doc``. Documents are
JSON-encoded with msgspec, so datetimes travel as RFC 3339 strings; on the way out the
known time fields are turned back into timezone-aware UTC datetimes and everything
else is returned exactly as it was decoded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from ..documents import NodeDoc, RunPatch, WriteBatch
from ..errors import ConfigError
from .base import NodeVersion, RunVersion

#: Fields of a run or node document that hold times (UTC datetimes in canonical form).
TIME_FIELDS: Final = ("startedAt", "completedAt")

encode_json = msgspec.json.Encoder().encode
_decoder = msgspec.json.Decoder()

#: An escaped U+0000 in msgspec's JSON output: ``\u0000`` preceded by an even number of
#: backslashes (an odd number would make it the literal text ``\u0000``).
_ESCAPED_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def decode_json(data: str | bytes) -> Any:
    return _decoder.decode(data)


def revive_times(doc: dict[str, Any]) -> dict[str, Any]:
    """Turn the known time fields of a decoded document back into UTC datetimes."""
    for name in TIME_FIELDS:
        value = doc.get(name)
        if isinstance(value, str):
            doc[name] = datetime.fromisoformat(value).astimezone(UTC)
    return doc


def utc(value: datetime) -> datetime:
    """A query bound as an aware UTC datetime (a naive one is taken to be UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def has_nul(encoded: bytes) -> bool:
    """Whether JSON produced by msgspec holds a U+0000 in a string or a key."""
    return b"\\u0000" in encoded and _ESCAPED_NUL.search(encoded) is not None


def sorted_runs(batch: WriteBatch) -> list[RunPatch]:
    """Runs in key order: every writer locks rows in the same order, so none deadlock."""
    return [run for _, run in sorted(batch.runs.items())]


def sorted_nodes(batch: WriteBatch) -> list[NodeDoc]:
    return [node for _, node in sorted(batch.nodes.items())]


def nodes_by_run(nodes: Iterable[NodeDoc]) -> dict[tuple[str, str], list[NodeDoc]]:
    out: dict[tuple[str, str], list[NodeDoc]] = {}
    for node in nodes:
        out.setdefault((node.workspace_id, node.run_id), []).append(node)
    return out


def node_order(doc: Mapping[str, Any]) -> tuple[bool, datetime, int, str]:
    """Execution order of node documents: startedAt (missing last), attempt, nodeId."""
    started = doc.get("startedAt")
    missing = not isinstance(started, datetime)
    when = started if isinstance(started, datetime) else datetime.min.replace(tzinfo=UTC)
    return (missing, when, int(doc.get("attempt") or 1), str(doc.get("nodeId")))


def wanted_runs(run_ids: Sequence[str], expected: Sequence[RunVersion]) -> dict[str, RunVersion]:
    """The versions of the runs named, in run ID order (a run without one is not touched)."""
    versions = {v.run_id: v for v in expected}
    return {run_id: versions[run_id] for run_id in sorted(set(run_ids)) if run_id in versions}


def nodes_unchanged(want: Mapping[str, RunVersion], run_ids: Iterable[str],
                    rows: Iterable[Sequence[Any]]) -> list[str]:
    """The runs among ``run_ids`` whose node documents are exactly the versions wanted.

    ``rows`` are the stored ``(run_id, node_key, event_id, status)`` of those runs: a
    node replaced, added or removed since the versions were read keeps its run.
    """
    have: dict[str, set[NodeVersion]] = {}
    for run_id, node_key, event_id, status in rows:
        have.setdefault(run_id, set()).add(NodeVersion(run_id, node_key, event_id, status))
    return [r for r in run_ids if have.get(r, set()) == want[r].nodes]


def version_columns(nodes: Iterable[NodeVersion]) -> tuple[list[str], list[str], list[str],
                                                              list[str]]:
    """Node versions as four parallel columns (run IDs, node keys, event IDs, statuses),
    in key order."""
    rows = sorted(set(nodes), key=lambda v: (v.run_id, v.node_key, v.event_id, v.status))
    return ([v.run_id for v in rows], [v.node_key for v in rows],
            [v.event_id for v in rows], [v.status for v in rows])


def pop_options(url: str, names: Mapping[str, type]) -> tuple[str, dict[str, Any]]:
    """Take this package's own options out of a URL's query string.

    Returns the URL without them and the options converted to ``names[option]``;
    a value that does not convert is a :class:`ConfigError`.
    """
    base, _, query = url.partition("?")
    kept: list[tuple[str, str]] = []
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        kind = names.get(key)
        if kind is None:
            kept.append((key, value))
            continue
        try:
            options[key] = kind(value)
        except ValueError:
            raise ConfigError(
                f"store URL option {key}={value!r} is not a valid {kind.__name__}"
            ) from None
    # Rebuilt by hand: urlunsplit would fold sqlite:////abs/path into sqlite://abs/path.
    return (f"{base}?{urlencode(kept)}" if kept else base), options


def redact(url: str) -> str:
    """A URL with its password hidden, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))

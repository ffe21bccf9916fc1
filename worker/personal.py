"""Which stored fields are personal: the paths erasure removes and the archive seals.

Always personal: node ``input`` (prompts), ``output`` (raw model responses) and
``error``, and the run's ``error``. ``AUDIT_PERSONAL_FIELDS`` adds more, as a comma list
of dot-separated paths into the stored documents: ``node.<path>`` for every node
document (``node.metadata.contact``, ``node.input.customer.email``), ``run.<path>`` for
the run document (``run.trigger.metadata.email``, ``run.customer``). A path walks
objects only (no list elements, no wildcards); each key is 1-64 characters of
``A-Z a-z 0-9 _ -``, not all digits. Fields that identify a document or decide how events merge
(IDs, status, times, attempt, type, model, the run index, subjects, erasure marks,
``trigger.type`` and ``trigger.source``) cannot be named.

Erasure (``worker.erasure``) removes these paths from hot storage (a run's top-level
field becomes null, any other field is removed); retention seals them in archived
records with the run's data key (``worker.shredding``), so shredding the key makes
them unreadable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from .errors import ConfigError

FieldPath = tuple[str, ...]

#: The fields always personal, per document kind.
DEFAULT: Final[Mapping[str, tuple[FieldPath, ...]]] = {
    "node": (("error",), ("input",), ("output",)),
    "run": (("error",),),
}
KINDS: Final = ("node", "run")
MAX_DEPTH: Final = 16
#: A key: not all digits (PostgreSQL would read those as list positions).
_PART: Final = re.compile(r"(?![0-9]+\Z)[A-Za-z0-9_-]{1,64}")
#: Top-level fields no personal path may start with (identity, merge rules, indexes).
_PROTECTED: Final[Mapping[str, frozenset[str]]] = {
    "node": frozenset({
        "workspaceId", "runId", "workflowId", "nodeKey", "nodeId", "attempt", "status",
        "eventId", "durationMs", "signedBy", "subjects", "type", "startedAt", "completedAt",
        "model", "tokens_used", "_id"}),
    "run": frozenset({
        "workspaceId", "runId", "workflowId", "status", "startedAt", "completedAt",
        "totalDuration", "summary", "nodeIndex", "eventIds", "signedBy", "subjects",
        "erasure", "erasureRequest", "erasureResult", "_id"}),
}
#: Nested fields no personal path may name (or lie under): filters use them.
_PROTECTED_NESTED: Final = {"run": (("trigger", "type"), ("trigger", "source")), "node": ()}


def check_path(kind: str, text: str | FieldPath) -> FieldPath:
    """One path of a ``kind`` document (``"metadata.contact"``), validated."""
    parts = tuple(text.split(".")) if isinstance(text, str) else tuple(text)
    where = ".".join(parts)
    if kind not in KINDS:
        raise ConfigError(f"personal field {where!r}: unknown document kind {kind!r}")
    if not parts or len(parts) > MAX_DEPTH or not all(
            isinstance(p, str) and _PART.fullmatch(p) for p in parts):
        raise ConfigError(f"personal field {kind}.{where}: dot-separated keys of "
                          f"A-Z a-z 0-9 _ - (1-64 characters each, at most {MAX_DEPTH})")
    if parts[0] in _PROTECTED[kind] or (kind == "run" and parts == ("trigger",)) or any(
            parts[:len(p)] == p for p in _PROTECTED_NESTED[kind]):
        raise ConfigError(f"personal field {kind}.{where}: identifies the document or "
                          "decides how events merge; it cannot be erased")
    return parts


def dotted(path: FieldPath) -> str:
    return ".".join(path)


@dataclass(frozen=True, slots=True)
class PersonalFields:
    """The personal paths of node and run documents (the defaults and the configured)."""

    node: tuple[FieldPath, ...] = DEFAULT["node"]
    run: tuple[FieldPath, ...] = DEFAULT["run"]

    @classmethod
    def parse(cls, items: Iterable[str]) -> PersonalFields:
        """``AUDIT_PERSONAL_FIELDS`` entries (``node.a.b``, ``run.c``) on top of the
        defaults; raises :class:`ConfigError` for a bad one."""
        found: dict[str, list[FieldPath]] = {k: list(DEFAULT[k]) for k in KINDS}
        for item in items:
            kind, sep, rest = item.strip().partition(".")
            if not sep or kind not in KINDS:
                raise ConfigError(f"AUDIT_PERSONAL_FIELDS: {item!r} must start with node. "
                                  "or run.")
            path = check_path(kind, rest)
            if path not in found[kind]:
                found[kind].append(path)
        return cls(*(tuple(sorted(found[k])) for k in KINDS))

    def of(self, kind: str) -> tuple[FieldPath, ...]:
        return self.node if kind == "node" else self.run

    def names(self, kind: str) -> list[str]:
        """The dotted paths of a kind, sorted (what erasure records)."""
        return sorted(dotted(p) for p in self.of(kind))

    def to_json(self) -> dict[str, list[str]]:
        return {"node": self.names("node"), "run": self.names("run")}


#: The defaults alone (nothing configured).
DEFAULTS: Final = PersonalFields()


def value_at(doc: Mapping[str, Any], path: FieldPath) -> Any:
    """The value at ``path`` (objects only), or None if there is none."""
    value: Any = doc
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def holds(doc: Mapping[str, Any], paths: Iterable[FieldPath]) -> bool:
    """Whether ``doc`` holds a non-null value at one of ``paths``."""
    return any(value_at(doc, p) is not None for p in paths)


def without(doc: Mapping[str, Any], paths: Sequence[FieldPath], *,
            null_top: bool = False) -> dict[str, Any]:
    """``doc`` without the values at ``paths`` (copied along each path, never changed in
    place); with ``null_top`` a top-level field is set to null instead (run documents)."""
    out = dict(doc)
    for path in paths:
        _remove(out, path, null_top)
    return out


def _remove(doc: dict[str, Any], path: FieldPath, null_top: bool) -> None:
    head, rest = path[0], path[1:]
    if not rest:
        if null_top:
            if doc.get(head) is not None:
                doc[head] = None
        else:
            doc.pop(head, None)
        return
    child = doc.get(head)
    if isinstance(child, Mapping) and value_at(child, rest) is not None:
        copy = dict(child)
        _remove(copy, rest, False)
        doc[head] = copy


def with_value(doc: Mapping[str, Any], path: FieldPath, value: Any) -> dict[str, Any]:
    """``doc`` with ``value`` at ``path`` (objects copied along the path, created where
    missing; ``doc`` itself is not changed)."""
    out = dict(doc)
    head, rest = path[0], path[1:]
    if not rest:
        out[head] = value
        return out
    child = out.get(head)
    out[head] = with_value(child if isinstance(child, Mapping) else {}, rest, value)
    return out

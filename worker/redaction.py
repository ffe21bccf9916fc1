"""Redaction before storage: drop or mask configured fields, mask detected personal data.

Applied by the worker to every decoded event before it is coalesced and written, and to
the payload of every dead letter. Off unless configured (``AUDIT_REDACT_*``).

- **Field paths** (``AUDIT_REDACT_DROP``, ``AUDIT_REDACT_MASK``): dot-separated keys;
  ``*`` matches any key of an object or any element of a list. A path that starts with
  ``node.`` applies to every node of the event (``node`` of node events, each of
  ``nodes`` of a snapshot); any other path applies to the event's top level
  (``trigger.metadata.from``, ``error.message``). Dropped fields are removed, masked
  ones become ``"[redacted]"``.
- **Detectors** (``AUDIT_REDACT_DETECTORS``: ``email``, ``phone``, ``card``, ``iban``)
  scan every string value and replace each finding by ``[email]``, ``[phone]``,
  ``[card]`` or ``[iban]``. Card numbers must pass the Luhn check, IBANs the ISO 13616
  mod-97 check. Identity fields (IDs, type, times, status, attempt, model) are never
  changed: they decide how events merge.

Redaction is a pure function of the event: the same event always gives the same
document, so redelivered and replayed events still merge idempotently. Pattern
detection misses things (names, addresses, numbers written in words, mapping keys, text
inside base64) and can over-match (a 10-digit order number written like a phone number);
it reduces what is stored, it does not prove absence.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from .errors import ConfigError

MASK: Final = "[redacted]"
DETECTORS: Final = ("email", "phone", "card", "iban")
#: Values of the ``detector`` label of the redactions counter: detectors and field rules.
COUNTER_LABELS: Final = (*DETECTORS, "drop", "mask")

#: Top-level event fields and node fields redaction never touches.
_EVENT_IDENTITY: Final = frozenset({
    "v", "eventId", "type", "workspaceId", "workflowId", "runId", "ts", "startedAt",
    "completedAt", "status", "totalDuration", "subjects",
})
_NODE_IDENTITY: Final = frozenset({
    "nodeId", "type", "attempt", "startedAt", "completedAt", "status", "model", "tokens_used",
})
_PATH_PART: Final = re.compile(r"[^.\s]+")

_EMAIL: Final = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_IBAN: Final = re.compile(r"\b[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,4})?\b")
_CARD: Final = re.compile(r"(?<![\w.,-])\d(?:[ -]?\d){12,18}(?![\w.,-])")
_PHONE: Final = re.compile(
    r"(?<![\w+.:/-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}"
    r"(?![\w:/])"
)
_DIGIT: Final = re.compile(r"\d")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a digit string (payment card numbers)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    """ISO 13616: 15-34 characters, country letters, and mod 97 == 1."""
    iban = text.replace(" ", "").upper()
    if not 15 <= len(iban) <= 34 or not iban[:2].isalpha() or not iban[2:4].isdigit():
        return False
    moved = iban[4:] + iban[:4]
    number = "".join(str(int(ch, 36)) for ch in moved)
    return int(number) % 97 == 1


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _card(match: re.Match[str]) -> bool:
    digits = _digits(match.group())
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _iban(match: re.Match[str]) -> bool:
    return iban_ok(match.group())


def _phone(match: re.Match[str]) -> bool:
    text = match.group()
    digits = _digits(text)
    if text.startswith("+"):
        return 7 <= len(digits) <= 15
    return 10 <= len(digits) <= 15 and not text.isdigit()  # a bare digit run is not a phone


_Check = Callable[[re.Match[str]], bool]
#: Detectors in the order they run (IBAN and card before phone: they overlap).
_SCANNERS: Final[tuple[tuple[str, re.Pattern[str], _Check | None, str], ...]] = (
    ("email", _EMAIL, None, "[email]"),
    ("iban", _IBAN, _iban, "[iban]"),
    ("card", _CARD, _card, "[card]"),
    ("phone", _PHONE, _phone, "[phone]"),
)


def parse_path(text: str) -> tuple[str, ...]:
    parts = tuple(text.strip().split("."))
    if not text.strip() or not all(_PATH_PART.fullmatch(p) for p in parts):
        raise ConfigError(f"redaction path {text!r}: dot-separated keys, '*' for any")
    return parts


@dataclass(frozen=True, slots=True)
class Redactor:
    """A configured redaction step. ``counts`` are per call: see :meth:`event`."""

    detectors: tuple[str, ...] = ()
    drop: tuple[tuple[str, ...], ...] = ()
    mask: tuple[tuple[str, ...], ...] = ()
    _scanners: tuple[tuple[str, re.Pattern[str], _Check | None, str], ...] = field(
        default=(), repr=False)

    @classmethod
    def build(cls, detectors: Iterable[str] = (), drop: Iterable[str] = (),
              mask: Iterable[str] = ()) -> Redactor | None:
        """The redactor for these settings, or None when redaction is off."""
        names = tuple(dict.fromkeys(d.strip().lower() for d in detectors if d.strip()))
        unknown = [d for d in names if d not in DETECTORS]
        if unknown:
            raise ConfigError(f"AUDIT_REDACT_DETECTORS: unknown {unknown}; "
                              f"known are {list(DETECTORS)}")
        drops = tuple(parse_path(p) for p in drop)
        masks = tuple(parse_path(p) for p in mask)
        for path in (*drops, *masks):
            if path in (("node",), ("nodes",)) or path[0] in _EVENT_IDENTITY or (
                    path[0] == "node" and len(path) > 1 and path[1] in _NODE_IDENTITY):
                raise ConfigError(f"redaction path {'.'.join(path)!r} names an identity "
                                  "field, which decides how events merge")
        if not (names or drops or masks):
            return None
        scanners = tuple(s for s in _SCANNERS if s[0] in names)
        return cls(names, drops, masks, scanners)

    # -- events ------------------------------------------------------------------------

    def event(self, doc: dict[str, Any], counts: dict[str, int]) -> None:
        """Redact a decoded event document in place; findings are added to ``counts``."""
        nodes: list[dict[str, Any]] = []
        node = doc.get("node")
        if isinstance(node, dict):
            nodes.append(node)
        many = doc.get("nodes")
        if isinstance(many, list):
            nodes.extend(n for n in many if isinstance(n, dict))
        for path in self.drop:
            for target, rest in self._targets(doc, nodes, path):
                counts["drop"] = counts.get("drop", 0) + _apply(target, rest, None)
        for path in self.mask:
            for target, rest in self._targets(doc, nodes, path):
                counts["mask"] = counts.get("mask", 0) + _apply(target, rest, MASK)
        if not self._scanners:
            return
        for key, value in doc.items():
            if key in _EVENT_IDENTITY or key in ("node", "nodes"):
                continue
            doc[key] = self._scan(value, counts)
        for n in nodes:
            for key, value in n.items():
                if key not in _NODE_IDENTITY:
                    n[key] = self._scan(value, counts)

    @staticmethod
    def _targets(doc: dict[str, Any], nodes: Sequence[dict[str, Any]],
                 path: tuple[str, ...]) -> list[tuple[Any, tuple[str, ...]]]:
        if path[0] == "node":
            return [(n, path[1:]) for n in nodes]
        return [(doc, path)]

    def _scan(self, value: Any, counts: dict[str, int]) -> Any:
        if isinstance(value, str):
            return self.text(value, counts)
        if isinstance(value, dict):
            for key, item in value.items():
                value[key] = self._scan(item, counts)
            return value
        if isinstance(value, list):
            for i, item in enumerate(value):
                value[i] = self._scan(item, counts)
        return value

    def text(self, text: str, counts: dict[str, int]) -> str:
        """``text`` with every finding of the configured detectors masked."""
        if not _DIGIT.search(text) and "@" not in text:
            return text
        for name, pattern, check, token in self._scanners:
            found = 0

            def replace(match: re.Match[str], check: _Check | None = check,
                        token: str = token) -> str:
                nonlocal found
                if check is not None and not check(match):
                    return match.group()
                found += 1
                return token

            text = pattern.sub(replace, text)
            if found:
                counts[name] = counts.get(name, 0) + found
        return text

    # -- dead letters ------------------------------------------------------------------

    def payload(self, data: bytes, counts: dict[str, int]) -> bytes:
        """A dead letter's payload redacted: as an event if it is a JSON object, else as
        text (detectors only). Unchanged bytes are returned as they are."""
        try:
            value = _json.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            text = data.decode("utf-8", "surrogateescape")
            redacted = self.text(text, counts) if self._scanners else text
            return data if redacted == text else redacted.encode("utf-8", "surrogateescape")
        found: dict[str, int] = {}
        if isinstance(value, dict):
            self.event(value, found)
        else:
            value = self._scan(value, found) if self._scanners else value
        if not any(found.values()):
            return data
        for name, count in found.items():
            counts[name] = counts.get(name, 0) + count
        return _encoder.encode(value)


_json = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def _apply(target: Any, path: tuple[str, ...], replacement: str | None) -> int:
    """Drop (``replacement`` None) or mask what ``path`` names under ``target``; count."""
    if not path:
        return 0
    head, rest = path[0], path[1:]
    children: list[tuple[Any, Any]]
    if isinstance(target, dict):
        children = list(target.items()) if head == "*" else (
            [(head, target[head])] if head in target else [])
    elif isinstance(target, list) and (head == "*" or head.isdigit()):
        indexes = range(len(target)) if head == "*" else [int(head)]
        children = [(i, target[i]) for i in indexes if i < len(target)]
    else:
        return 0
    if rest:
        return sum(_apply(child, rest, replacement) for _, child in children)
    if replacement is None:
        if isinstance(target, dict):
            for key, _ in children:
                del target[key]
        else:
            for index, _ in sorted(children, reverse=True):
                del target[index]
    else:
        for key, _ in children:
            target[key] = replacement
    return len(children)

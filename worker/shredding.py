"""Crypto-shredding of archived personal fields: per-run data keys, wrapped by a master key.

When ``AUDIT_ARCHIVE_MASTER_KEY_FILE`` names a master key (base64 of 32 bytes), retention
encrypts the personal fields of every record it archives — node ``input``, ``output``
and ``error``, the run ``error`` and the paths ``AUDIT_PERSONAL_FIELDS`` adds
(``worker.personal``), the fields erasure strips from hot storage — with the run's
**data key** (AES-256-GCM, a fresh random 96-bit nonce per field). The associated data
binds each ciphertext to its place (workspace, run, node key, field path), so a
ciphertext moved to another record or field fails authentication. A field (at the top
level or nested) is archived as an envelope in its place::

    {"$enc": "aes-256-gcm", "kid": "<data key id>", "n": "<b64 nonce>", "ct": "<b64>"}

Data keys live in the store (``audit_data_keys``: workspace, run, key id, wrapped key,
created, shredded), wrapped with AES-256-GCM under the master key with the key's place
(workspace, run, key id) as associated data. The store write of a key happens before
the segment using it is committed, so no committed ciphertext is ever without its key.

Erasure shreds the keys of the subject's runs: the wrapped key is removed and the row
keeps when (``shreddedAt``), so the archive segments stay byte-for-byte the same (the
hash chain verifies) while the fields can no longer be read: they read as
``{"erased": true, "at": <shreddedAt>}``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .archive import canonical
from .errors import AuditFleetError, ConfigError
from .personal import (
    DEFAULTS,
    MAX_DEPTH,
    FieldPath,
    PersonalFields,
    dotted,
    value_at,
    with_value,
)
from .queries import utcnow
from .stores.base import RetentionStore, StoredKey

ENC: Final = "$enc"
#: The key id of an erasure's tombstone: a keyless row erasure stores for every run it
#: erases, before shredding, so a retention pass running meanwhile seals that run only
#: under a key it shreds itself (no data key id is ever this: they are 16 hex digits).
TOMBSTONE: Final = "erased"
ALG: Final = "aes-256-gcm"
#: Personal fields always encrypted in archived records (the fields erasure strips).
SEALED: Final = {"run": ("error",), "node": ("error", "input", "output")}
_NONCE: Final = 12


class SealError(AuditFleetError):
    """A data key or ciphertext does not authenticate (wrong master key, moved data)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _place(*parts: str | None) -> bytes:
    return json.dumps(["audit-fleet/v1", *parts], separators=(",", ":")).encode()


def field_aad(workspace: str, run_id: str, node_key: str | None, name: str) -> bytes:
    """The associated data of one encrypted field: its workspace, run, node and name."""
    return _place(workspace, run_id, node_key, name)


def load_master_key(path: str) -> bytes:
    """The master key: base64 of exactly 32 bytes in a file (a mounted secret)."""
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"AUDIT_ARCHIVE_MASTER_KEY_FILE: cannot read {path!r}: "
                          f"{exc.strerror}") from None
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        raise ConfigError(f"AUDIT_ARCHIVE_MASTER_KEY_FILE {path!r} is not base64") from None
    if len(key) != 32:
        raise ConfigError(f"AUDIT_ARCHIVE_MASTER_KEY_FILE {path!r} must hold 32 bytes "
                          f"(base64), got {len(key)}")
    return key


def is_envelope(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get(ENC) == ALG


class MasterKey:
    """Wraps and unwraps data keys (the key itself is never in a repr or a log)."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "MasterKey(<secret>)"

    def new_key(self, workspace: str, run_id: str) -> tuple[StoredKey, bytes]:
        """A fresh data key for a run: the row to store and the key."""
        key = AESGCM.generate_key(bit_length=256)
        kid = secrets.token_hex(8)
        nonce = os.urandom(_NONCE)
        wrapped = nonce + self._aead.encrypt(nonce, key, _place(workspace, run_id, kid))
        return StoredKey(run_id, kid, wrapped, utcnow()), key

    def unwrap(self, workspace: str, row: StoredKey) -> bytes:
        if row.wrapped is None:
            raise SealError(f"data key {row.key_id} of run {row.run_id} was shredded")
        try:
            return self._aead.decrypt(row.wrapped[:_NONCE], row.wrapped[_NONCE:],
                                      _place(workspace, row.run_id, row.key_id))
        except InvalidTag:
            raise SealError(f"data key {row.key_id} of run {row.run_id} does not unwrap "
                            "(another master key?)") from None


def _outermost(paths: Iterable[FieldPath]) -> list[FieldPath]:
    """The paths not inside another one (sealing a field seals what it holds)."""
    ordered = sorted(set(paths))
    return [p for p in ordered if not any(q != p and p[:len(q)] == q for q in ordered)]


def seal(workspace: str, kind: str, doc: Mapping[str, Any], kid: str, key: bytes,
         fields: PersonalFields = DEFAULTS) -> dict[str, Any]:
    """``doc`` with its personal fields encrypted under the run's data key."""
    out = dict(doc)
    aead = AESGCM(key)
    node_key = str(doc["nodeKey"]) if kind == "node" else None
    for path in _outermost(fields.of(kind)):
        value = value_at(out, path)
        if value is None or is_envelope(value):
            continue
        name = dotted(path)
        nonce = os.urandom(_NONCE)
        ct = aead.encrypt(nonce, canonical(value).encode(),
                          field_aad(workspace, str(doc["runId"]), node_key, name))
        out = with_value(out, path, {ENC: ALG, "kid": kid, "n": _b64(nonce), "ct": _b64(ct)})
    return out


def envelopes(doc: Mapping[str, Any], depth: int = MAX_DEPTH) -> Iterator[
        tuple[FieldPath, Mapping[str, Any]]]:
    """Every envelope in a record (top-level or nested in objects), with its path."""
    for key, value in doc.items():
        if not isinstance(value, Mapping):
            continue
        if is_envelope(value):
            yield (str(key),), value
        elif depth > 1:
            for path, env in envelopes(value, depth - 1):
                yield (str(key), *path), env


class Opener:
    """Decrypts archived records with the data keys of a workspace, as read from the store.

    A field whose key was shredded reads as ``{"erased": true, "at": ...}``; one whose
    key is not in the store at all as ``{"erased": true, "at": null, "reason": ...}``.
    A ciphertext that does not authenticate (moved, changed) raises :class:`SealError`.
    """

    def __init__(self, workspace: str, master: MasterKey | None,
                 rows: Iterable[StoredKey]) -> None:
        self.workspace = workspace
        self.master = master
        self.rows = {(r.run_id, r.key_id): r for r in rows}
        self._keys: dict[tuple[str, str], bytes] = {}

    def key_state(self, run_id: str, kid: str) -> str:
        """``live``, ``shredded`` or ``missing``."""
        row = self.rows.get((run_id, kid))
        if row is None:
            return "missing"
        return "live" if row.wrapped is not None else "shredded"

    def open_field(self, run_id: str, node_key: str | None, name: str,
                   env: Mapping[str, Any]) -> Any:
        kid = str(env.get("kid"))
        row = self.rows.get((run_id, kid))
        if row is None:
            return {"erased": True, "at": None, "reason": f"data key {kid} not in the store"}
        if row.wrapped is None:
            at = row.shredded_at.isoformat() if row.shredded_at else None
            return {"erased": True, "at": at}
        if self.master is None:
            raise ConfigError("reading encrypted archive fields needs "
                              "AUDIT_ARCHIVE_MASTER_KEY_FILE")
        key = self._keys.get((run_id, kid))
        if key is None:
            key = self._keys[(run_id, kid)] = self.master.unwrap(self.workspace, row)
        try:
            plain = AESGCM(key).decrypt(base64.b64decode(str(env["n"])),
                                        base64.b64decode(str(env["ct"])),
                                        field_aad(self.workspace, run_id, node_key, name))
        except (InvalidTag, ValueError, KeyError):
            raise SealError(f"run {run_id}: archived {name} of "
                            f"{node_key or 'the run'} does not authenticate "
                            "(moved or changed ciphertext)") from None
        return json.loads(plain)

    def open(self, kind: str, doc: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(doc)
        if kind not in SEALED:
            return out
        node_key = str(doc["nodeKey"]) if kind == "node" else None
        for path, env in list(envelopes(doc)):
            out = with_value(out, path, self.open_field(str(doc["runId"]), node_key,
                                                        dotted(path), env))
        return out


def sealed_kids(kind: str, doc: Mapping[str, Any]) -> set[str]:
    """The data key ids a record's envelopes name."""
    if kind not in SEALED:
        return set()
    return {str(env["kid"]) for _, env in envelopes(doc)}


def holds_personal(kind: str, doc: Mapping[str, Any],
                   fields: PersonalFields = DEFAULTS) -> bool:
    """Whether a record holds a personal field in clear."""
    if kind not in SEALED:
        return False
    return any(value_at(doc, p) is not None and not is_envelope(value_at(doc, p))
               for p in fields.of(kind))


def tombstone(run_id: str, at: datetime) -> StoredKey:
    """The row erasure stores for a run before it shreds the run's keys."""
    return StoredKey(run_id, TOMBSTONE, None, at)


def erased(rows: Iterable[StoredKey]) -> set[str]:
    """The runs an erasure has begun on (those with a tombstone)."""
    return {r.run_id for r in rows if r.key_id == TOMBSTONE}


class Sealer:
    """Seals the records retention archives, with one data key per run (created and
    stored before any segment using it is committed; a live stored key is reused).

    Erasure stores a tombstone for each run (:func:`tombstone`), then shreds its keys. A
    run with a tombstone — seen before or after this pass stored its key — is sealed
    under a key shredded here before the segment is committed: its archived personal
    fields read as erased. A tombstone stored after that second look is followed by the
    erasure's own shredding, which takes the key stored here. Either way no archived copy
    of an erased run stays readable, whatever the interleaving."""

    def __init__(self, store: RetentionStore, master: MasterKey, workspace: str,
                 fields: PersonalFields = DEFAULTS) -> None:
        self.store = store
        self.master = master
        self.workspace = workspace
        self.fields = fields
        self.keys: dict[str, tuple[str, bytes]] = {}

    async def prepare(self, run_ids: Iterable[str]) -> None:
        need = sorted(set(run_ids) - set(self.keys))
        if not need:
            return
        for row in await self.store.data_keys(self.workspace, need):
            if row.wrapped is not None and row.run_id not in self.keys:
                self.keys[row.run_id] = (row.key_id, self.master.unwrap(self.workspace, row))
        fresh = [self.master.new_key(self.workspace, r) for r in need if r not in self.keys]
        if fresh:
            await self.store.put_data_keys(self.workspace, [row for row, _ in fresh])
            for row, key in fresh:
                self.keys[row.run_id] = (row.key_id, key)
        gone = erased(await self.store.data_keys(self.workspace, need))  # after storing
        if gone:
            await self.store.shred_data_keys(self.workspace, sorted(gone), utcnow())

    def seal(self, kind: str, doc: Mapping[str, Any]) -> dict[str, Any]:
        if not holds_personal(kind, doc, self.fields):
            return dict(doc)
        kid, key = self.keys[str(doc["runId"])]
        return seal(self.workspace, kind, doc, kid, key, self.fields)


async def load_opener(store: RetentionStore, master: MasterKey | None, workspace: str,
                      run_ids: Sequence[str] | None = None) -> Opener:
    """An :class:`Opener` with the stored data keys of a workspace (or of some runs)."""
    return Opener(workspace, master, await store.data_keys(workspace, run_ids))


@dataclass(slots=True)
class ShredReport:
    """What a workspace's archive holds encrypted, and how much of it was shredded."""

    sealed_records: int = 0
    shredded_records: int = 0
    shredded_runs: set[str] = field(default_factory=set)
    missing_records: int = 0
    missing_runs: set[str] = field(default_factory=set)

    def add(self, kind: str, doc: Mapping[str, Any], opener: Opener) -> None:
        kids = sealed_kids(kind, doc)
        if not kids:
            return
        self.sealed_records += 1
        run_id = str(doc["runId"])
        states = {opener.key_state(run_id, kid) for kid in kids}
        if "missing" in states:
            self.missing_records += 1
            self.missing_runs.add(run_id)
        elif "shredded" in states:
            self.shredded_records += 1
            self.shredded_runs.add(run_id)

    def lines(self) -> list[str]:
        out = [f"{self.sealed_records} records with encrypted personal fields; "
               f"{self.shredded_records} records of {len(self.shredded_runs)} runs "
               "crypto-shredded (keys deleted)"]
        if self.missing_records:
            out.append(f"{self.missing_records} records of {len(self.missing_runs)} runs name "
                       "a data key the store does not hold (unreadable)")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"sealedRecords": self.sealed_records,
                "shreddedRecords": self.shredded_records,
                "shreddedRuns": sorted(self.shredded_runs),
                "missingKeyRecords": self.missing_records,
                "missingKeyRuns": sorted(self.missing_runs)}


def shred_report(records: Iterable[tuple[str, str, dict[str, Any]]],
                 opener: Opener) -> ShredReport:
    """Count encrypted and shredded records (``records`` as ``Archive.records`` yields)."""
    report = ShredReport()
    for _, kind, doc in records:
        report.add(kind, doc, opener)
    return report

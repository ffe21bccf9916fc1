"""Signed events: per-workspace HMAC-SHA256 over the exact bytes of the ``event`` field.

The wire contract (docs/events.md, "Signed events"): a stream entry may carry a second
field ``sig`` = ``<keyId>:<hex HMAC-SHA256 of the event field's bytes>``, keyed with a
secret of the workspace the event names. A producer holding only workspace A's secret
cannot write an event that names B: B's secrets do not verify it.

The keyring is a JSON file ``{"<workspaceId>": {"<keyId>": "<base64 secret>"}}``
(``AUDIT_SIGNING_KEYS_FILE``, typically a mounted secret). Several key ids of a workspace
are valid at once, so keys rotate without a pause: add the new key to the workers'
keyring, move producers to it, then remove the old one. Secrets never appear in a repr,
a log line or an error message.

This module is pure: :func:`verify` turns an entry's fields into a :class:`Verdict`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

import msgspec

from .constants import Reason
from .errors import ConfigError

#: Key ids: short, printable, never containing ``:`` (the separator in ``sig``).
KEY_ID: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_WORKSPACE: Final = re.compile(r"[A-Za-z0-9_-]{1,48}")
_HEX_DIGEST: Final = re.compile(rb"[0-9a-fA-F]{64}")
#: Shortest secret accepted: 16 bytes (HMAC-SHA256 keys should be 32).
MIN_SECRET_BYTES: Final = 16


@dataclass(frozen=True, slots=True)
class Keyring:
    """Secrets per workspace and key id. Its repr names counts only, never a secret."""

    keys: Mapping[str, Mapping[str, bytes]] = field(repr=False)

    def __repr__(self) -> str:
        count = sum(len(k) for k in self.keys.values())
        return f"Keyring({len(self.keys)} workspaces, {count} keys)"

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "keyring") -> Keyring:
        """Parse ``{"<ws>": {"<keyId>": "<base64 secret>"}}``; errors never quote a secret."""
        try:
            raw = json.loads(text)
        except ValueError:
            raise ConfigError(f"{source}: not valid JSON") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: must be a JSON object of workspaces")
        keys: dict[str, dict[str, bytes]] = {}
        for ws, ring in raw.items():
            if not _WORKSPACE.fullmatch(ws):
                raise ConfigError(f"{source}: {ws!r} is not a valid workspace id")
            if not isinstance(ring, dict) or not ring:
                raise ConfigError(f"{source}: workspace {ws!r} must map key ids to secrets")
            keys[ws] = {}
            for key_id, secret in ring.items():
                if not KEY_ID.fullmatch(key_id):
                    raise ConfigError(f"{source}: {ws!r}: key id {key_id!r} must match "
                                      f"{KEY_ID.pattern}")
                keys[ws][key_id] = _secret(secret, f"{source}: {ws!r}/{key_id!r}")
        return cls(keys)

    @classmethod
    def load(cls, path: str | Path) -> Keyring:
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"AUDIT_SIGNING_KEYS_FILE: cannot read {str(path)!r}: "
                              f"{exc.strerror}") from None
        return cls.from_json(text, source=f"AUDIT_SIGNING_KEYS_FILE {str(path)!r}")

    def secret(self, workspace: str, key_id: str) -> bytes | None:
        ring = self.keys.get(workspace)
        return None if ring is None else ring.get(key_id)

    def active_key(self, workspace: str) -> tuple[str, bytes]:
        """The key a producer signs with: the last one listed for the workspace."""
        ring = self.keys.get(workspace)
        if not ring:
            raise SigningError(f"no signing key for workspace {workspace!r}")
        key_id = list(ring)[-1]
        return key_id, ring[key_id]


class SigningError(ConfigError):
    """A producer was asked to sign for a workspace its keyring has no key for."""


def _secret(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: the secret must be a base64 string")
    try:
        secret = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where}: the secret is not valid base64") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"{where}: the secret must be at least {MIN_SECRET_BYTES} bytes")
    return secret


def load_secret(path: str | Path, variable: str) -> bytes:
    """A base64 secret from a file (a mounted secret), at least 16 bytes."""
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {str(path)!r}: {exc.strerror}") from None
    return _secret(text, f"{variable} {str(path)!r}")


def digest(secret: bytes, payload: bytes) -> str:
    """Hex HMAC-SHA256 of ``payload``."""
    return hmac.digest(secret, payload, "sha256").hex()  # one-shot: no HMAC object


def sign(payload: bytes, key_id: str, secret: bytes) -> bytes:
    """The ``sig`` field for ``payload`` (the exact bytes of the ``event`` field)."""
    return f"{key_id}:{digest(secret, payload)}".encode()


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a signature check says about one entry.

    ``reason`` is None when the entry may go on: then ``key_id`` is the key that signed
    it (None: unsigned and allowed) and ``workspace`` the workspace it was verified for,
    which the decoded event must name.
    """

    reason: str | None = None
    error: str = ""
    key_id: str | None = None
    workspace: str | None = None
    #: A signature was present (so the decoded event must name ``workspace``).
    checked: bool = False

    @property
    def ok(self) -> bool:
        return self.reason is None


UNSIGNED: Final = Verdict()


class _Envelope(msgspec.Struct):
    workspaceId: str


_envelope = msgspec.json.Decoder(_Envelope)


def verify(keyring: Keyring, payload: bytes, sig: bytes | None, *, required: bool) -> Verdict:
    """Check ``sig`` against the secrets of the workspace ``payload`` names.

    A payload that does not even name a workspace cannot be checked and is passed on
    (the decoder dead-letters it: ``workspaceId`` is required); the caller still checks
    that the decoded event names the workspace verified here.
    """
    if sig is None:
        if required:
            return Verdict(Reason.SIGNATURE_MISSING, "entry has no 'sig' field "
                           "(AUDIT_REQUIRE_SIGNATURE is on)")
        return UNSIGNED
    key_id_raw, sep, hex_digest = sig.partition(b":")
    key_id = key_id_raw.decode("ascii", "replace")
    if not sep or not KEY_ID.fullmatch(key_id) or not _HEX_DIGEST.fullmatch(hex_digest):
        return Verdict(Reason.SIGNATURE_INVALID,
                       "'sig' must be <keyId>:<64 hex digits of HMAC-SHA256>")
    try:
        workspace = _envelope.decode(payload).workspaceId
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return Verdict(checked=True)
    secret = keyring.secret(workspace, key_id)
    if secret is None:
        return Verdict(Reason.SIGNATURE_UNKNOWN_KEY,
                       f"key id {key_id!r} is not a key of workspace {workspace[:48]!r}")
    expected = digest(secret, payload).encode()
    if not hmac.compare_digest(expected, hex_digest.lower()):
        return Verdict(Reason.SIGNATURE_INVALID,
                       f"the signature does not match key {key_id!r} of workspace "
                       f"{workspace[:48]!r} (signed with another workspace's key, or altered)")
    return Verdict(key_id=key_id, workspace=workspace, checked=True)


@dataclass(frozen=True, slots=True)
class SignaturePolicy:
    """What the worker does with signatures: with a keyring, a ``sig`` present is always
    checked; ``required`` also refuses entries without one."""

    keyring: Keyring
    required: bool

    @classmethod
    def of(cls, settings: _HasKeyring) -> SignaturePolicy | None:
        if settings.keyring is None:
            return None
        return cls(settings.keyring, settings.require_signature)

    def check(self, payload: bytes, sig: bytes | None) -> Verdict:
        return verify(self.keyring, payload, sig, required=self.required)


class _HasKeyring(Protocol):
    @property
    def keyring(self) -> Keyring | None: ...
    @property
    def require_signature(self) -> bool: ...


def mismatch(verdict: Verdict, workspace: str) -> Verdict | None:
    """The dead-letter verdict when the decoded event names another workspace than the
    one its signature was checked for (None when they agree)."""
    if not verdict.checked or verdict.workspace == workspace:
        return None
    return Verdict(Reason.SIGNATURE_INVALID,
                   "the signature was not checked against the workspace the event names")

"""Read-API tokens: making them, parsing scopes, and checking a presented token.

A token is ``aft_<id>_<secret>``: a 16-hex-digit ID and 256 random bits. The store keeps
only its SHA-256 digest (a high-entropy secret needs no slow hash); a presented token
is found by its ID and compared with :func:`hmac.compare_digest`, so neither the lookup
nor the comparison tells anything about the secret. Every request checks the store,
so a revoked token stops working at once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from ..errors import ConfigError
from ..queries import check_workspace
from ..stores.access import AccessStore, TokenRecord, millis

RUNS_READ: Final = "runs:read"
PROMPTS_READ: Final = "prompts:read"
SCOPES: Final = (RUNS_READ, PROMPTS_READ)

_TOKEN: Final = re.compile(r"aft_([0-9a-f]{16})_[A-Za-z0-9_-]{43}")
#: Compared against when no token has the presented ID, so a miss costs the same.
_NO_DIGEST: Final = "0" * 64


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def parse_scopes(text: str) -> tuple[str, ...]:
    """``runs:read`` or ``runs:read,prompts:read``; prompts:read needs runs:read."""
    scopes = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ConfigError(f"unknown scope(s) {', '.join(bad) or '(none)'}: use "
                          f"{RUNS_READ} or {RUNS_READ},{PROMPTS_READ}")
    if RUNS_READ not in scopes:
        raise ConfigError(f"{PROMPTS_READ} is given on top of {RUNS_READ}: "
                          f"use --scope {RUNS_READ},{PROMPTS_READ}")
    return tuple(s for s in SCOPES if s in scopes)


def parse_workspaces(values: Iterable[str]) -> tuple[str, ...]:
    """Workspace IDs from repeated or comma-separated options, each checked."""
    names = [w.strip() for v in values for w in v.split(",") if w.strip()]
    if not names:
        raise ConfigError("a token is bound to at least one workspace (--workspace W)")
    return tuple(sorted({check_workspace(w) for w in names}))


def new_token(workspaces: tuple[str, ...], scopes: tuple[str, ...], *, now: datetime,
              label: str | None = None) -> tuple[str, TokenRecord]:
    """A fresh token and the record to store for it."""
    token_id = secrets.token_hex(8)
    token = f"aft_{token_id}_{secrets.token_urlsafe(32)}"
    return token, TokenRecord(token_id, digest(token), workspaces, scopes, millis(now), label)


def token_id_of(token: str) -> str | None:
    match = _TOKEN.fullmatch(token)
    return match.group(1) if match else None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is: the token it presented."""

    token: TokenRecord

    @property
    def token_id(self) -> str:
        return self.token.token_id

    def sees(self, workspace: str) -> bool:
        return workspace in self.token.workspaces

    def may(self, scope: str) -> bool:
        return scope in self.token.scopes


async def authenticate(access: AccessStore, presented: str | None) -> Principal | None:
    """The principal of a presented token, or None (malformed, unknown, wrong, revoked)."""
    if not presented:
        return None
    token_id = token_id_of(presented)
    record = await access.get_token(token_id) if token_id else None
    ok = hmac.compare_digest(record.digest if record else _NO_DIGEST, digest(presented))
    if record is None or not ok or record.revoked_at is not None:
        return None
    return Principal(record)

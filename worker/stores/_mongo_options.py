"""The MongoDB store's options: tenancy, database prefix, large payloads, write concern."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from .. import constants as c
from ..errors import ConfigError
from . import _mongo_codec as mc
from . import _mongo_write as mw

DEFAULT_SHARED_DB: Final = "audit"
TENANCY_MODES: Final = ("database", "field")

_URL_WRITE_CONCERN: Final = frozenset({"w", "journal", "wtimeoutms"})


@dataclass(frozen=True, slots=True)
class MongoOptions:
    """Store options: from the ``AUDIT_MONGO_*`` settings (:meth:`Settings.mongo_options`)
    and the store's keyword arguments."""

    tenancy: str = "database"
    db_prefix: str = c.DEFAULT_MONGO_DB_PREFIX
    large_payload_bytes: int = c.DEFAULT_MONGO_LARGE_PAYLOAD_BYTES
    #: Write concern; None leaves it to the URL, or ``majority`` with journal.
    w: int | str | None = None
    journal: bool | None = None

    def __post_init__(self) -> None:
        if self.tenancy not in TENANCY_MODES:
            raise ConfigError(f"AUDIT_MONGO_TENANCY must be database or field, got "
                              f"{self.tenancy!r}")
        problem = mc.prefix_problem(self.db_prefix)
        if problem:
            raise ConfigError(problem)
        if self.large_payload_bytes <= 0 or self.large_payload_bytes > mw.MAX_BSON_BYTES // 2:
            raise ConfigError("AUDIT_MONGO_LARGE_PAYLOAD_BYTES must be positive and at most "
                              f"{mw.MAX_BSON_BYTES // 2}, got {self.large_payload_bytes}")


def client_options(url: str, options: MongoOptions) -> dict[str, Any]:
    """The driver's options: the write concern ``{w: "majority", j: true}`` unless the URL
    or the options set one, and retryable writes unless the URL says otherwise."""
    query = {k.lower() for k, _ in parse_qsl(urlsplit(url).query)}
    opts: dict[str, Any] = {"tz_aware": True, "tzinfo": UTC, "appname": "audit-fleet"}
    if options.w is not None:
        opts["w"] = options.w
    elif not query & _URL_WRITE_CONCERN:
        opts["w"] = "majority"
    if options.journal is not None:
        opts["journal"] = options.journal
    elif not query & _URL_WRITE_CONCERN:
        opts["journal"] = True
    if "retrywrites" not in query:
        opts["retryWrites"] = True
    return opts

"""The exception hierarchy: one root, setup errors are also ``ValueError``."""

from __future__ import annotations


class AuditFleetError(Exception):
    """Root of every error Audit Fleet raises on purpose."""


class ConfigError(AuditFleetError, ValueError):
    """Bad configuration, reported at start with a message a person can act on."""


class InvalidEvent(AuditFleetError, ValueError):
    """An event that can never be stored; ``reason`` is a short machine code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class StoreError(AuditFleetError):
    """A store failed to write or read."""


class StoreUnavailable(StoreError):
    """A transient store failure (network, failover, timeout): retry the same write."""


class StoreTimeout(StoreUnavailable):
    """A write ran past the store's command timeout. Either the store is unreachable
    (retry it like any outage) or this write is too large to finish in time (split it)."""


class StoreMisconfigured(StoreError, ConfigError):
    """The store refuses this configuration for good (authentication failed, the database
    does not exist, a path that cannot be opened): waiting cannot help, the setting must
    change."""


class NotReady(AuditFleetError):
    """A dependency is not there yet (``/readyz`` shows the message as the check's state)."""


class StoreRejected(StoreError):
    """A permanent store failure for the data written: retrying cannot succeed."""


class RedisUnavailable(AuditFleetError):
    """Redis cannot serve a command now: unreachable, timed out, out of memory
    (``maxmemory`` reached), loading, or a cluster slot moved/down. Back off and try
    again; nothing was acknowledged on its account. ``kind`` names which (a metric label).
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class RedisRefused(AuditFleetError):
    """Redis refused a command for a reason retrying soon will not cure (e.g. the
    dead-letter key holds another type: ``WRONGTYPE``). ``kind`` is a metric label."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class ArchiveError(AuditFleetError):
    """The archive is unreadable, incomplete or does not verify."""

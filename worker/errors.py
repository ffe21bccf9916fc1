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


class StoreRejected(StoreError):
    """A permanent store failure for the data written: retrying cannot succeed."""

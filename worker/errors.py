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


class StoreNotOpen(AuditFleetError, RuntimeError):
    """A store used before :meth:`open` or after :meth:`close`: a programming error, never
    retried (unlike :class:`StoreUnavailable`)."""


class StoreMisconfigured(StoreError, ConfigError):
    """The store refuses this configuration for good (authentication failed, the database
    does not exist, a path that cannot be opened): waiting cannot help, the setting must
    change."""


class NotReady(AuditFleetError):
    """A dependency is not there yet (``/readyz`` shows the message as the check's state)."""


class StoreRejected(StoreError):
    """A permanent store failure for the data written: retrying cannot succeed."""


class RedisFailure(AuditFleetError):
    """A Redis command failed; raised by the Redis edge (:mod:`worker.redisio`) only.
    ``kind`` names which failure (a metric label), ``detail`` is Redis's message."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class RedisUnavailable(RedisFailure):
    """Redis cannot serve a command now: unreachable, timed out, out of memory
    (``maxmemory`` reached), loading, or a cluster failing over or moving a slot
    (CLUSTERDOWN, TRYAGAIN, MASTERDOWN, READONLY, MOVED/ASK). Back off and try again;
    nothing was acknowledged on its account.
    """


class RedisRefused(RedisFailure):
    """Redis refused a command for a reason retrying soon will not cure (e.g. the
    dead-letter key holds another type: ``WRONGTYPE``)."""


class GroupMissing(RedisRefused):
    """The consumer group (or its stream) is gone: NOGROUP, or UNBLOCKED for a blocked
    read whose stream was deleted. The answer is to create the group again."""


class StreamMissing(RedisRefused):
    """The stream does not exist (``no such key`` from XINFO)."""


class NotReplicated(AuditFleetError):
    """``WAIT`` after XADD: fewer replicas than asked acknowledged within the timeout."""

    def __init__(self, acked: int, wanted: int, timeout_ms: int) -> None:
        super().__init__(f"{acked} of {wanted} replicas acknowledged within {timeout_ms} ms")
        self.acked = acked
        self.wanted = wanted


class ArchiveError(AuditFleetError):
    """The archive is unreadable, incomplete or does not verify."""

"""Audit Fleet: audit trails for AI workflows, from Redis Streams to a durable store."""

from __future__ import annotations

__version__ = "0.1.0"

from .emitter import AuditEmitter, RunRecorder, make_event
from .errors import AuditFleetError, ConfigError, InvalidEvent, StoreRejected, StoreUnavailable
from .settings import Settings

__all__ = [
    "AuditEmitter",
    "AuditFleetError",
    "ConfigError",
    "InvalidEvent",
    "RunRecorder",
    "Settings",
    "StoreRejected",
    "StoreUnavailable",
    "__version__",
    "make_event",
]

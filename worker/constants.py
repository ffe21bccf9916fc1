"""Every Redis key pattern, field name and default in one place."""

from __future__ import annotations

#: The single stream entry field that carries an event as UTF-8 JSON.
EVENT_FIELD = "event"

#: The optional entry field that signs the event field (``<keyId>:<hex HMAC-SHA256>``).
SIG_FIELD = "sig"

#: The event contract version this worker understands.
SCHEMA_VERSION = 1

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_STREAM = "audit:events"
DEFAULT_GROUP = "audit-writers"
DEFAULT_STORE_URL = "sqlite:///./audit.db"
DEFAULT_BATCH_SIZE = 500
DEFAULT_BLOCK_MS = 1000
DEFAULT_CLAIM_IDLE_MS = 60_000
DEFAULT_MAX_DELIVERIES = 5
DEFAULT_METRICS_PORT = 9464
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_INFLIGHT = 4
#: Payload bytes a worker holds at most (read, not yet settled); one entry up to
#: DEFAULT_MAX_EVENT_BYTES is always taken alone. See worker/budget.py.
DEFAULT_INFLIGHT_BYTES = 64 * 1024 * 1024
DEFAULT_LINGER_MS = 20
DEFAULT_SHUTDOWN_GRACE_S = 25.0
#: After the grace period: the longest cancelled work and closing the store and Redis may
#: take. A process exits within grace + deadline (35 s) whatever the store does.
DEFAULT_SHUTDOWN_DEADLINE_S = 10.0
DEFAULT_RECLAIM_INTERVAL_S = 5.0
#: Longest pause between retries of a store write, a settle or a group creation (seconds).
DEFAULT_RETRY_MAX_BACKOFF_S = 10.0
#: MongoDB: the database of workspace W is <prefix>W (AUDIT_MONGO_TENANCY=database).
DEFAULT_MONGO_DB_PREFIX = "audit_"
#: MongoDB: node payloads above this move to GridFS.
DEFAULT_MONGO_LARGE_PAYLOAD_BYTES = 4 * 1024 * 1024
DEFAULT_TRIM_INTERVAL_S = 30.0
DEFAULT_TRIM_RETENTION_S = 3600.0
DEFAULT_FLEET_POLL_INTERVAL_S = 10.0
#: Bounds of each dead-letter stream (0: no bound). Past them the hygiene round drops the
#: oldest dead letters, counted and logged; alerts fire at 80% first. See worker/dlq_bound.py.
DEFAULT_DLQ_MAX_AGE_S = 30 * 24 * 3600.0
DEFAULT_DLQ_MAX_BYTES = 512 * 1024 * 1024
#: Values of the ``bound`` label of ``dead_letters_dropped_total``.
DLQ_BOUNDS = ("age", "size")

#: Dead-letter stream of a source stream.
DLQ_SUFFIX = ":dlq"


def dlq_key(stream: str) -> str:
    """The dead-letter stream that belongs to ``stream``."""
    return stream + DLQ_SUFFIX


#: Fields of a dead-letter entry (and ``sig`` when the entry was signed); a
#: ``duplicate_field`` dead letter also keeps the entry's further ``event`` values as
#: ``event_2``, ``event_3``, …
DLQ_FIELDS = ("reason", "error", "stream", "id", "deliveries", "event", "consumer", "ts")


class Reason:
    """Dead-letter reason codes (stable: dashboards and ``dlq list --reason`` use them)."""

    MISSING_FIELD = "missing_field"
    DUPLICATE_FIELD = "duplicate_field"
    INVALID_JSON = "invalid_json"
    INVALID_UTF8 = "invalid_utf8"
    TOO_LARGE = "too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    SCHEMA = "schema_violation"
    STORE_REJECTED = "store_rejected"
    MAX_DELIVERIES = "max_deliveries"
    PROCESSING_ERROR = "processing_error"
    SIGNATURE_MISSING = "signature_missing"
    SIGNATURE_UNKNOWN_KEY = "signature_unknown_key"
    SIGNATURE_INVALID = "signature_invalid"


#: Every dead-letter reason (metrics start each stream x reason at 0).
REASONS: tuple[str, ...] = tuple(
    value for name, value in vars(Reason).items() if name.isupper() and isinstance(value, str)
)


#: ``AUDIT_*`` variables read outside :class:`worker.settings.Settings` (whose fields name
#: the others). ``config check`` and ``run`` report any other ``AUDIT_*`` name as unknown.
OTHER_ENV_NAMES = ("AUDIT_ARCHIVE_SCRATCH", "AUDIT_S3_ENDPOINT_URL")

#: Prefixes of variables used by the test suite and the benchmarks, never by a worker.
TOOLING_ENV_PREFIXES = ("AUDIT_TEST_", "AUDIT_BENCH_")

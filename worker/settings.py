"""One frozen settings object, built from the environment and CLI flags."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import constants as c
from .errors import ConfigError
from .personal import PersonalFields
from .redaction import Redactor
from .redisclient import mode_of
from .signing import Keyring, load_secret

if TYPE_CHECKING:
    from .stores._mongo_options import MongoOptions

_STORE_SCHEMES = ("sqlite", "postgresql", "postgres", "mongodb", "mongodb+srv", "null")


def mask_url(url: str) -> str:
    """``url`` with its password (and any ``password=`` query value) replaced by ``***``."""
    import re

    # scheme://user:password@host -> scheme://user:***@host (the last @ ends the userinfo)
    masked = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/?#@:]*):[^/?#]*@", r"\1:***@", url)
    return re.sub(r"([?&](?:password|pass|secret|token)=)[^&#]*", r"\1***", masked,
                  flags=re.IGNORECASE)


def default_consumer() -> str:
    """``hostname-pid``: unique per process, stable for its lifetime."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Worker configuration. Invalid combinations are rejected at construction."""

    redis_url: str = c.DEFAULT_REDIS_URL
    redis_mode: str = "auto"
    streams: tuple[str, ...] = (c.DEFAULT_STREAM,)
    group: str = c.DEFAULT_GROUP
    consumer: str = ""
    store_url: str = c.DEFAULT_STORE_URL
    #: Archive directory or s3://bucket/prefix (retention, archive, erase, explain --archive).
    archive_dir: str | None = None
    batch_size: int = c.DEFAULT_BATCH_SIZE
    block_ms: int = c.DEFAULT_BLOCK_MS
    claim_idle_ms: int = c.DEFAULT_CLAIM_IDLE_MS
    max_deliveries: int = c.DEFAULT_MAX_DELIVERIES
    metrics_port: int = c.DEFAULT_METRICS_PORT
    metrics_host: str = "0.0.0.0"
    max_event_bytes: int = c.DEFAULT_MAX_EVENT_BYTES
    max_inflight: int = c.DEFAULT_MAX_INFLIGHT
    inflight_bytes: int = c.DEFAULT_INFLIGHT_BYTES
    linger_ms: int = c.DEFAULT_LINGER_MS
    shutdown_grace_s: float = c.DEFAULT_SHUTDOWN_GRACE_S
    shutdown_deadline_s: float = c.DEFAULT_SHUTDOWN_DEADLINE_S
    reclaim_interval_s: float = c.DEFAULT_RECLAIM_INTERVAL_S
    #: AUDIT_RETRY_MAX_BACKOFF_S: the longest pause between retries while the store or
    #: Redis is unavailable (exponential backoff with jitter up to this).
    retry_max_backoff_s: float = c.DEFAULT_RETRY_MAX_BACKOFF_S
    trim: bool = True
    trim_interval_s: float = c.DEFAULT_TRIM_INTERVAL_S
    trim_retention_s: float = c.DEFAULT_TRIM_RETENTION_S
    #: AUDIT_DLQ_MAX_AGE_S / AUDIT_DLQ_MAX_BYTES: bounds of each dead-letter stream, 0 for
    #: none (``worker.dlq_bound``: the oldest go past a bound, counted and logged).
    dlq_max_age_s: float = c.DEFAULT_DLQ_MAX_AGE_S
    dlq_max_bytes: int = c.DEFAULT_DLQ_MAX_BYTES
    fleet_poll_interval_s: float = c.DEFAULT_FLEET_POLL_INTERVAL_S
    burst: bool = False
    log_level: str = "info"
    log_format: str = "auto"
    #: AUDIT_SIGNING_KEYS_FILE: the keyring file (a path; the secrets are in ``keyring``).
    signing_keys_file: str = ""
    #: AUDIT_REQUIRE_SIGNATURE: dead-letter entries without a valid ``sig``.
    require_signature: bool = False
    #: AUDIT_REDACT_DETECTORS / _DROP / _MASK: redaction before storage (``worker.redaction``).
    redact_detectors: tuple[str, ...] = ()
    redact_drop: tuple[str, ...] = ()
    redact_mask: tuple[str, ...] = ()
    #: AUDIT_SUBJECT_KEY_FILE: the key that hashes data-subject ids (``worker.erasure``).
    subject_key_file: str = ""
    #: AUDIT_ARCHIVE_MASTER_KEY_FILE: base64 of 32 bytes; wraps the archive's per-run data
    #: keys (``worker.shredding``). Unset: archived personal fields are not encrypted.
    archive_master_key_file: str = ""
    #: AUDIT_PERSONAL_FIELDS: more personal field paths (``node.metadata.contact``,
    #: ``run.trigger.metadata.email``) that erasure removes and the archive seals, on top of
    #: node input/output/error and the run error (``worker.personal``).
    personal_fields: tuple[str, ...] = ()
    #: Loaded from ``signing_keys_file``; never in the repr.
    keyring: Keyring | None = field(default=None, repr=False, compare=False)
    #: Loaded from ``subject_key_file``; never in the repr.
    subject_key: bytes | None = field(default=None, repr=False, compare=False)
    #: Loaded from ``archive_master_key_file``; never in the repr.
    archive_master_key: bytes | None = field(default=None, repr=False, compare=False)
    emit_wait_replicas: int = 0
    emit_wait_timeout_ms: int = 100
    #: AUDIT_MONGO_TENANCY: a database per workspace (``database``) or one shared
    #: database with compound keys (``field``); docs/mongodb.md.
    mongo_tenancy: str = "database"
    #: AUDIT_MONGO_DB_PREFIX: the database of workspace W is <prefix>W (may be empty).
    mongo_db_prefix: str = c.DEFAULT_MONGO_DB_PREFIX
    #: AUDIT_MONGO_LARGE_PAYLOAD_BYTES: node payloads above this move to GridFS.
    mongo_large_payload_bytes: int = c.DEFAULT_MONGO_LARGE_PAYLOAD_BYTES

    def __post_init__(self) -> None:
        if not self.consumer:
            object.__setattr__(self, "consumer", default_consumer())
        if self.signing_keys_file and self.keyring is None:
            object.__setattr__(self, "keyring", Keyring.load(self.signing_keys_file))
        if self.subject_key_file and self.subject_key is None:
            object.__setattr__(self, "subject_key", load_secret(
                self.subject_key_file, "AUDIT_SUBJECT_KEY_FILE"))
        if self.archive_master_key_file and self.archive_master_key is None:
            from .shredding import load_master_key

            object.__setattr__(self, "archive_master_key",
                               load_master_key(self.archive_master_key_file))
        self._validate()

    def _validate(self) -> None:
        mode_of(self.redis_url, self.redis_mode)
        scheme = urlsplit(self.store_url).scheme
        if scheme not in _STORE_SCHEMES:
            raise ConfigError(
                "AUDIT_STORE_URL must start with one of "
                + ", ".join(s + "://" for s in _STORE_SCHEMES)
                + f"; got {self.store_url!r}"
            )
        if not self.streams or any(not s for s in self.streams):
            raise ConfigError("AUDIT_STREAM must name at least one stream")
        if any(s.endswith(c.DLQ_SUFFIX) for s in self.streams):
            raise ConfigError(f"AUDIT_STREAM must not be a dead-letter stream (*{c.DLQ_SUFFIX})")
        if len(set(self.streams)) != len(self.streams):
            raise ConfigError("AUDIT_STREAM names a stream twice")
        if not self.group:
            raise ConfigError("AUDIT_GROUP must not be empty")
        _positive("AUDIT_BATCH_SIZE", self.batch_size, upper=100_000)
        _positive("AUDIT_BLOCK_MS", self.block_ms, upper=600_000)
        _positive("AUDIT_CLAIM_IDLE_MS", self.claim_idle_ms)
        _positive("AUDIT_MAX_DELIVERIES", self.max_deliveries, upper=1_000)
        _positive("AUDIT_MAX_EVENT_BYTES", self.max_event_bytes, upper=512 * 1024 * 1024)
        _positive("AUDIT_MAX_INFLIGHT", self.max_inflight, upper=64)
        _positive("AUDIT_INFLIGHT_BYTES", self.inflight_bytes, upper=64 * 1024**3)
        if not 0 <= self.linger_ms <= 1000:
            raise ConfigError(f"AUDIT_LINGER_MS must be 0..1000, got {self.linger_ms}")
        if not 0 <= self.emit_wait_replicas <= 16 or self.emit_wait_timeout_ms < 0:
            raise ConfigError("AUDIT_EMIT_WAIT_REPLICAS must be 0..16 and "
                              "AUDIT_EMIT_WAIT_TIMEOUT_MS >= 0")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"AUDIT_METRICS_PORT must be 0..65535, got {self.metrics_port}")
        if (self.shutdown_grace_s < 0 or self.shutdown_deadline_s <= 0
                or self.reclaim_interval_s <= 0 or self.trim_interval_s <= 0
                or self.fleet_poll_interval_s <= 0 or self.retry_max_backoff_s <= 0):
            raise ConfigError("grace and interval settings must be positive")
        if self.trim_retention_s < 0:
            raise ConfigError("AUDIT_TRIM_RETENTION_S must be >= 0")
        if self.dlq_max_age_s < 0:
            raise ConfigError("AUDIT_DLQ_MAX_AGE_S must be >= 0 (0: no age bound)")
        if self.dlq_max_bytes and self.dlq_max_bytes < 2 * self.max_event_bytes:
            raise ConfigError(
                f"AUDIT_DLQ_MAX_BYTES must be 0 (no size bound) or at least twice "
                f"AUDIT_MAX_EVENT_BYTES ({2 * self.max_event_bytes}), got {self.dlq_max_bytes}"
            )
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(
                f"AUDIT_LOG_LEVEL must be debug|info|warning|error, got {self.log_level!r}"
            )
        self.redactor()  # raises ConfigError for unknown detectors or bad paths
        self.personal()  # raises ConfigError for a bad or protected path
        if self.store_scheme in ("mongodb", "mongodb+srv"):
            self.mongo_options()  # raises ConfigError for a bad tenancy, prefix or size
        if self.require_signature and self.keyring is None:
            raise ConfigError("AUDIT_REQUIRE_SIGNATURE needs AUDIT_SIGNING_KEYS_FILE (the keyring)")
        if self.log_format not in ("auto", "json", "console"):
            raise ConfigError(
                f"AUDIT_LOG_FORMAT must be auto|json|console, got {self.log_format!r}"
            )

    @property
    def dlq_bounded(self) -> bool:
        """Whether a dead-letter bound is set (the hygiene round then applies it)."""
        return bool(self.dlq_max_age_s or self.dlq_max_bytes)

    def mongo_options(self) -> MongoOptions:
        """The MongoDB store's options (validated: a ConfigError names the variable)."""
        from .stores._mongo_options import MongoOptions

        return MongoOptions(tenancy=self.mongo_tenancy, db_prefix=self.mongo_db_prefix,
                            large_payload_bytes=self.mongo_large_payload_bytes)

    def redactor(self) -> Redactor | None:
        """The redaction step these settings configure (None: redaction is off)."""
        return Redactor.build(self.redact_detectors, self.redact_drop, self.redact_mask)

    def personal(self) -> PersonalFields:
        """The personal field paths (the defaults and ``AUDIT_PERSONAL_FIELDS``)."""
        return PersonalFields.parse(self.personal_fields)

    @property
    def store_scheme(self) -> str:
        return urlsplit(self.store_url).scheme

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> Settings:
        """Read ``AUDIT_*`` variables; keyword overrides (CLI flags) win when not None."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in _NOT_ENV:
                continue
            name = env_name(f.name)
            raw = env.get(name)
            if raw is None or (raw == "" and f.name not in _EMPTY_OK):
                continue
            values[f.name] = _parse(name, f.name, raw)
        for key, value in overrides.items():
            if value is not None:
                values[key] = value
        try:
            return cls(**values)
        except TypeError as exc:  # an unknown override name is a programming error
            raise ConfigError(str(exc)) from exc

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def setting(name: str, override: Any = None, env: Mapping[str, str] | None = None) -> Any:
    """One field as :meth:`Settings.from_env` reads it (``override``, else its variable,
    else its default) without building the whole object, for a path that must not fail
    on another variable (an error message naming the Redis URL)."""
    if override is not None:
        return override
    env = os.environ if env is None else env
    raw = env.get(env_name(name))
    if raw or (raw == "" and name in _EMPTY_OK):
        return _parse(env_name(name), name, raw)
    return next(f.default for f in fields(Settings) if f.name == name)


_ENV_NAMES = {"streams": "AUDIT_STREAM"}


def env_name(field_name: str) -> str:
    """The environment variable of a :class:`Settings` field."""
    return _ENV_NAMES.get(field_name, "AUDIT_" + field_name.upper())


def known_env_names() -> frozenset[str]:
    """Every ``AUDIT_*`` variable something in Audit Fleet reads."""
    return frozenset(
        [env_name(f.name) for f in fields(Settings) if f.name != "keyring"]
        + list(c.OTHER_ENV_NAMES)
    )


def unknown_env(env: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """``AUDIT_*`` variables nothing reads (a typo such as ``AUDIT_BATCHSIZE``), each with
    the known name it most resembles (or None)."""
    import difflib

    env = os.environ if env is None else env
    known = known_env_names()
    out = []
    for name in sorted(env):
        if not name.startswith("AUDIT_") or name in known \
                or name.startswith(c.TOOLING_ENV_PREFIXES):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        out.append((name, close[0] if close else None))
    return out


def describe_unknown(name: str, suggestion: str | None) -> str:
    hint = f" (did you mean {suggestion}?)" if suggestion else ""
    return f"unknown variable {name} is ignored{hint}"
_INTS = {
    "batch_size", "block_ms", "claim_idle_ms", "max_deliveries", "metrics_port",
    "max_event_bytes", "max_inflight", "inflight_bytes", "linger_ms", "emit_wait_replicas",
    "emit_wait_timeout_ms", "dlq_max_bytes", "mongo_large_payload_bytes",
}
_FLOATS = {"shutdown_grace_s", "shutdown_deadline_s", "reclaim_interval_s", "trim_interval_s",
           "trim_retention_s", "dlq_max_age_s", "fleet_poll_interval_s", "retry_max_backoff_s"}
_BOOLS = {"trim", "burst", "require_signature"}
_LISTS = {"streams", "redact_detectors", "redact_drop", "redact_mask", "personal_fields"}
#: Fields whose variable may be set to the empty string (an empty database prefix).
_EMPTY_OK = {"mongo_db_prefix"}
#: Fields that are not read from the environment under their own name.
_NOT_ENV = {"keyring", "subject_key", "archive_master_key"}


def _parse(env_name: str, field: str, raw: str) -> Any:
    try:
        if field in _INTS:
            return int(raw)
        if field in _FLOATS:
            return float(raw)
    except ValueError:
        raise ConfigError(f"{env_name} must be a number, got {raw!r}") from None
    if field in _BOOLS:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{env_name} must be true or false, got {raw!r}")
    if field == "streams":
        return expand_streams(raw)
    if field == "mongo_tenancy":
        return raw.strip().lower()
    if field in _LISTS:
        return tuple(s.strip() for s in raw.split(",") if s.strip())
    return raw


_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_streams(raw: str) -> tuple[str, ...]:
    """``audit:events:{0..3}`` → the four hash-tagged shards ``audit:events:{0}`` …
    ``{3}``; a comma list names streams one by one (each item may hold a range)."""
    out: list[str] = []
    for item in (s.strip() for s in raw.split(",")):
        if not item:
            continue
        match = _RANGE.search(item)
        if match is None:
            out.append(item)
            continue
        low, high = int(match.group(1)), int(match.group(2))
        if high < low or high - low >= 1024:
            raise ConfigError(f"AUDIT_STREAM range {match.group(0)} must be {{low..high}} "
                              "with low <= high and at most 1024 shards")
        out.extend(item[: match.start()] + "{" + str(i) + "}" + item[match.end():]
                   for i in range(low, high + 1))
    return tuple(out)


def _positive(name: str, value: int, upper: int | None = None) -> None:
    if value <= 0 or (upper is not None and value > upper):
        bound = f" and at most {upper}" if upper is not None else ""
        raise ConfigError(f"{name} must be positive{bound}, got {value}")

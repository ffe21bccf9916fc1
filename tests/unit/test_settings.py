"""Configuration: environment, CLI overrides, and clear errors for bad values."""

from __future__ import annotations

import pytest

from worker.errors import ConfigError
from worker.settings import Settings


def test_defaults_match_the_documented_configuration() -> None:
    """With no environment, the documented defaults apply."""
    s = Settings.from_env({})
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.streams == ("audit:events",)
    assert s.group == "audit-writers"
    assert s.store_url == "sqlite:///./audit.db"
    assert s.metrics_port == 9464
    assert "-" in s.consumer  # hostname-pid


def test_environment_is_read_and_flags_override_it() -> None:
    """AUDIT_* variables are parsed; a non-None keyword (a CLI flag) wins."""
    env = {"AUDIT_STREAM": "a:events, b:events", "AUDIT_BATCH_SIZE": "200",
           "AUDIT_STORE_URL": "null://", "AUDIT_BURST": "yes", "AUDIT_CONSUMER": "c1"}
    s = Settings.from_env(env, batch_size=50, group=None)
    assert s.streams == ("a:events", "b:events")
    assert s.batch_size == 50
    assert s.store_url == "null://"
    assert s.burst is True
    assert s.consumer == "c1"
    assert s.group == "audit-writers"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AUDIT_BATCH_SIZE": "lots"}, "AUDIT_BATCH_SIZE must be a number"),
        ({"AUDIT_BATCH_SIZE": "0"}, "AUDIT_BATCH_SIZE must be positive"),
        ({"AUDIT_STORE_URL": "mysql://x"}, "AUDIT_STORE_URL must start with"),
        ({"AUDIT_REDIS_URL": "http://x"}, "AUDIT_REDIS_URL must be"),
        ({"AUDIT_METRICS_PORT": "70000"}, "AUDIT_METRICS_PORT"),
        ({"AUDIT_STREAM": "audit:events:dlq"}, "dead-letter"),
        ({"AUDIT_BURST": "maybe"}, "AUDIT_BURST must be true or false"),
        ({"AUDIT_LOG_LEVEL": "loud"}, "AUDIT_LOG_LEVEL"),
        ({"AUDIT_LINGER_MS": "5000"}, "AUDIT_LINGER_MS"),
    ],
)
def test_bad_configuration_fails_with_a_clear_message(env: dict[str, str], message: str) -> None:
    """Each bad value is refused at construction, naming the variable."""
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_config_errors_are_value_errors() -> None:
    """Setup errors subclass ValueError as well as the project's root error."""
    assert issubclass(ConfigError, ValueError)

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
    assert (s.dlq_max_age_s, s.dlq_max_bytes, s.dlq_bounded) == (30 * 86400, 512 * 2**20, True)
    off = Settings.from_env({"AUDIT_DLQ_MAX_AGE_S": "0", "AUDIT_DLQ_MAX_BYTES": "0"})
    assert not off.dlq_bounded


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
        ({"AUDIT_DLQ_MAX_AGE_S": "-1"}, "AUDIT_DLQ_MAX_AGE_S must be >= 0"),
        ({"AUDIT_DLQ_MAX_BYTES": "1000000"}, "at least twice AUDIT_MAX_EVENT_BYTES"),
    ],
)
def test_bad_configuration_fails_with_a_clear_message(env: dict[str, str], message: str) -> None:
    """Each bad value is refused at construction, naming the variable."""
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_config_errors_are_value_errors() -> None:
    """Setup errors subclass ValueError as well as the project's root error."""
    assert issubclass(ConfigError, ValueError)


def test_unknown_audit_variables_are_reported_with_a_suggestion() -> None:
    """Regression: a typo such as AUDIT_BATCHSIZE was silently ignored."""
    from worker.settings import unknown_env

    env = {"AUDIT_BATCHSIZE": "5", "AUDIT_BATCH_SIZE": "7", "AUDIT_STREAM": "s",
           "AUDIT_ARCHIVE_DIR": "/a", "AUDIT_TEST_MONGODB_URL": "x", "AUDIT_ZZZ": "1",
           "HOME": "/root"}
    assert unknown_env(env) == [("AUDIT_BATCHSIZE", "AUDIT_BATCH_SIZE"), ("AUDIT_ZZZ", None)]


def test_every_audit_variable_the_code_and_docs_name_is_known() -> None:
    """A variable read anywhere (or documented) is known to `config check`: a new one must
    be a Settings field or listed in constants.OTHER_ENV_NAMES."""
    import re
    from pathlib import Path

    from worker import constants as c
    from worker.settings import known_env_names

    root = Path(__file__).resolve().parents[2]
    texts = [p.read_text() for p in [*(root / "worker").rglob("*.py"),
                                     *(root / "docs").glob("*.md"), root / "README.md",
                                     *(root / "deploy").rglob("*.y*ml")]]
    names = {n for t in texts for n in re.findall(r"\bAUDIT_[A-Z0-9_]*[A-Z0-9]\b", t)}
    names = {n for n in names if not n.startswith(c.TOOLING_ENV_PREFIXES)}
    names.discard("AUDIT_BATCHSIZE")  # the typo the docs use as an example
    assert len(names) >= 30
    # prefixes written as AUDIT_REDACT_* / AUDIT_MONGO_* in prose are not variables
    unknown = {n for n in names - known_env_names()
               if not any(k.startswith(n + "_") for k in known_env_names())}
    assert not unknown, f"read or documented but unknown to config check: {sorted(unknown)}"


def test_mask_url_hides_passwords_only() -> None:
    """Passwords in the userinfo or a password= query are masked; the rest stays."""
    from worker.settings import mask_url

    assert mask_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert mask_url("postgresql://u:p@ss@h/db?password=x&sslmode=require") == (
        "postgresql://u:***@h/db?password=***&sslmode=require")
    assert mask_url("sqlite:///./audit.db") == "sqlite:///./audit.db"
    assert mask_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_every_setting_is_in_the_readme_settings_table() -> None:
    """Each Settings field read from the environment has a row in README's settings table
    (a row may name several as `AUDIT_X_A` / `_B`)."""
    from dataclasses import fields
    from pathlib import Path

    from worker.settings import _NOT_ENV, Settings, env_name

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("| variable | default | meaning |")
    table = readme[start:readme.index("\n\n", start)]
    missing = [env_name(f.name) for f in fields(Settings) if f.name not in _NOT_ENV
               and f"`{env_name(f.name)}`" not in table
               and f"`_{env_name(f.name).rsplit('_', 1)[1]}`" not in table]
    assert missing == []


def test_the_retry_backoff_and_the_mongodb_options_are_settings() -> None:
    """AUDIT_RETRY_MAX_BACKOFF_S and AUDIT_MONGO_* are read and checked like every other
    setting (an empty database prefix is a value, not an unset variable)."""
    from worker.errors import ConfigError
    from worker.settings import Settings

    s = Settings.from_env({"AUDIT_RETRY_MAX_BACKOFF_S": "0.25", "AUDIT_MONGO_TENANCY": " Field",
                           "AUDIT_MONGO_DB_PREFIX": "", "AUDIT_METRICS_PORT": "0"})
    assert s.retry_max_backoff_s == 0.25
    options = s.mongo_options()
    assert (options.tenancy, options.db_prefix) == ("field", "")
    with pytest.raises(ConfigError, match="grace and interval"):
        Settings.from_env({"AUDIT_RETRY_MAX_BACKOFF_S": "0"})

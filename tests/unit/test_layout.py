"""The tree stays as the docs say: README's module table names every module, no module
grows past 600 lines, the package has no import cycles, Redis clients are made in one
place only, and no test double hides from the type checker."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import ROOT


def _module_table() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("| module | concept |")
    return readme[start:readme.index("\n\n", start)]


def test_readme_module_table_lists_every_module() -> None:
    table = _module_table()
    named = set(re.findall(r"`([^`]+)`", table))
    missing = []
    for path in sorted((ROOT / "worker").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if path.name in ("__init__.py", "__main__.py"):
            continue
        if rel in named or path.name in named or path.stem in named:
            continue
        missing.append(rel)
    assert missing == []
    for ref in re.findall(r"`(worker/[^`]+\.py)`", table):
        assert (ROOT / ref).is_file(), f"README names {ref}, which does not exist"


def test_no_module_grows_past_600_lines() -> None:
    over = {path.relative_to(ROOT).as_posix()
            for path in (ROOT / "worker").rglob("*.py")
            if len(path.read_text().splitlines()) > 600}
    assert over == set(), f"past 600 lines: {sorted(over)}"


#: How a Redis client is made without the factory (redis-py's constructors).
CLIENT_CONSTRUCTORS = re.compile(
    r"\b(?:Redis|StrictRedis|RedisCluster|Sentinel|ConnectionPool|BlockingConnectionPool)"
    r"(?:\.from_url)?\(")


def test_every_redis_client_comes_from_the_one_factory() -> None:
    """Only worker/redisclient.py builds a redis-py client; everything else calls it (a
    plain ``Redis.from_url`` cannot follow a cluster's MOVED or a Sentinel failover)."""
    bypass = [f"{path.relative_to(ROOT).as_posix()}:{n}: {line.strip()}"
              for path in sorted((ROOT / "worker").rglob("*.py"))
              if path.name != "redisclient.py"
              for n, line in enumerate(path.read_text().splitlines(), 1)
              if CLIENT_CONSTRUCTORS.search(line) and "AuditEmitter.from_url" not in line]
    assert bypass == []


def test_no_import_cycles() -> None:
    result = subprocess.run([sys.executable, str(ROOT / ".ci" / "check_imports.py")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("no import cycles among ")


def test_no_test_double_forwards_by_getattr() -> None:
    """mypy takes a class with ``__getattr__`` for any protocol, so a double forwarding that
    way hides the methods it lacks: doubles subclass the protocol they stand in for
    (``tests.helpers.StoreProxy``, ``ReadWriteStore``) and override what they change."""
    found = [f"{path.relative_to(ROOT).as_posix()}:{n}"
             for path in sorted((ROOT / "tests").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if re.match(r"\s+def __getattr__\(", line)]
    assert found == []


#: An import of a test module or of conftest.py (fixtures are found by pytest, not imported).
TEST_MODULE_IMPORT = re.compile(
    r"^\s*(?:from|import)\s+(?:tests\.(?:conftest|unit|integration)\b|\.+test_|tests\.test_)")


def test_no_test_imports_conftest_or_another_test_module() -> None:
    """Shared fixtures live in tests/conftest.py, tools in tests/helpers.py and its
    neighbours. Importing conftest.py loads it a second time as a plain module (its set-up
    runs twice); a fixture imported from a test module becomes a second definition of it."""
    found = [f"{path.relative_to(ROOT).as_posix()}:{n}: {line.strip()}"
             for path in sorted((ROOT / "tests").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if TEST_MODULE_IMPORT.match(line)]
    assert found == []

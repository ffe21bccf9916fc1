"""Start-up: the store is waited for with the one retry policy, and each wait is logged."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from worker import service
from worker.errors import StoreUnavailable
from worker.settings import Settings
from worker.stores.null import NullStore

pytestmark = pytest.mark.anyio


class FlakyStore(NullStore):
    """Unreachable for its first ``failures`` opens (over all instances)."""

    failures = 0

    async def open(self) -> None:
        if FlakyStore.failures > 0:
            FlakyStore.failures -= 1
            raise StoreUnavailable("connection refused")
        await super().open()


async def test_open_store_waiting_logs_each_wait_then_opens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FlakyStore.failures = 2
    monkeypatch.setattr(service, "store_from", lambda settings, **kw: FlakyStore())
    settings = Settings.from_env(store_url="null://")
    with capture_logs() as logs:
        store = await service.open_store_waiting(settings, attempts=3)
    assert isinstance(store, FlakyStore)
    waits = [e for e in logs if e["event"] == "store_unreachable_waiting"]
    assert len(waits) == 2
    assert all(e["log_level"] == "warning" and e["error"] == "connection refused"
               for e in waits)
    first, second = (e["retry_in_s"] for e in waits)
    assert 0.5 <= first <= 1.0, "the first wait is about initial_s, plus jitter"
    assert 1.0 <= second <= 1.5, "then it doubles"


async def test_open_store_waiting_gives_up_after_the_attempts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FlakyStore.failures = 5
    monkeypatch.setattr(service, "store_from", lambda settings, **kw: FlakyStore())
    with capture_logs() as logs, pytest.raises(StoreUnavailable, match="refused"):
        await service.open_store_waiting(Settings.from_env(store_url="null://"), attempts=2)
    assert [e["event"] for e in logs] == ["store_unreachable_waiting"]

"""The one retry policy: exponential backoff, capped, with jitter."""

from __future__ import annotations

import random

import pytest
from tenacity import RetryCallState, Retrying

from worker import retry


def _state(attempt: int) -> RetryCallState:
    state = RetryCallState(retry_object=Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    return state


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    random.seed(7)
    wait = retry.backoff(initial_s=0.5, max_s=4.0)
    for attempt, base in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        waits = [wait(_state(attempt)) for _ in range(200)]
        assert min(waits) >= base
        assert max(waits) <= min(base + 0.5, 4.0)
        if base < 4.0:
            assert max(waits) - min(waits) > 0.1, "jitter spreads the waits"


@pytest.mark.anyio
async def test_retrying_retries_only_the_named_errors_and_reraises_the_last() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    calls = 0
    async for attempt in retry.retrying(ConnectionError, initial_s=0.01, max_s=0.02,
                                        sleep=sleep):
        with attempt:
            calls += 1
            if calls < 3:
                raise ConnectionError("down")
    assert (calls, len(slept)) == (3, 2)

    async def not_retried() -> None:
        async for attempt in retry.retrying(ConnectionError, sleep=sleep):
            with attempt:
                raise KeyError("not retried")

    with pytest.raises(KeyError):
        await not_retried()
    assert len(slept) == 2, "no wait before a non-retried error"

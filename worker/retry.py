"""The one retry policy: exponential backoff with jitter (tenacity), for every wait-and-retry.

Every place that waits for Redis or a store to come back (creating the groups, reading,
writing a batch, settling, opening the store at start) retries through :func:`retrying`:
the first wait is about ``initial_s``, each next one doubles up to ``max_s``, and a random
jitter of up to ``initial_s`` keeps a fleet of workers from retrying in lockstep.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_never
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_exponential_jitter

__all__ = ["backoff", "retrying"]


def backoff(*, initial_s: float, max_s: float) -> wait_base:
    """Waits of ``initial_s``, ``2 * initial_s``, ... up to ``max_s``, each plus a jitter of
    up to ``initial_s``."""
    return wait_exponential_jitter(multiplier=initial_s, max=max_s, jitter=initial_s)


def retrying(
    retry_on: type[BaseException] | tuple[type[BaseException], ...],
    *,
    initial_s: float = 0.1,
    max_s: float = 10.0,
    stop: stop_base | Callable[[RetryCallState], bool] = stop_never,
    before_sleep: Callable[[RetryCallState], Any] | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> AsyncRetrying:
    """Retry on ``retry_on`` with :func:`backoff` until ``stop``; the last error is re-raised.

    ``sleep`` replaces the wait (a worker passes one that returns early when it stops)."""
    kwargs: dict[str, Any] = {}
    if sleep is not None:
        kwargs["sleep"] = sleep
    if before_sleep is not None:
        kwargs["before_sleep"] = before_sleep
    return AsyncRetrying(
        retry=retry_if_exception_type(retry_on),
        wait=backoff(initial_s=initial_s, max_s=max_s),
        stop=stop,
        reraise=True,
        **kwargs,
    )

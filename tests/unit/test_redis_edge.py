"""The Redis edge: redis-py errors translated once; settling ACKs only what is confirmed."""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, OutOfMemoryError, ResponseError

from worker import constants as c
from worker.errors import GroupMissing, RedisRefused, RedisUnavailable
from worker.redisio import Entry, dead_letter, settle, translate

GROUP = c.DEFAULT_GROUP


@pytest.mark.parametrize(("error", "kind"), [
    (OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), "oom"),
    (MovedError("3999 127.0.0.1:6381"), "moved"),
    (RedisConnectionError("Connection reset by peer"), "connection"),
    (ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
     "wrongtype"),
])
def test_redis_errors_are_translated_once_at_the_edge(error: Exception, kind: str) -> None:
    """redis-py errors become RedisUnavailable (retry) or RedisRefused, with a metric kind."""
    mapped = translate(error)
    assert mapped is not None
    assert mapped.kind == kind
    assert isinstance(mapped, RedisRefused if kind == "wrongtype" else RedisUnavailable)
    assert isinstance(translate(ResponseError("NOGROUP No such key or consumer group")),
                      GroupMissing)
    assert translate(ValueError("not Redis")) is None


class _StubPipeline:
    def __init__(self, owner: _StubRedis) -> None:
        self.owner = owner

    async def __aenter__(self) -> _StubPipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def xadd(self, key: str, fields: dict[Any, Any]) -> None:
        self.owner.xadds.append(key)

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        return list(self.owner.replies)


class _StubRedis:
    """Answers each XADD of a pipeline with a scripted reply (a cluster's MOVED …)."""

    def __init__(self, replies: list[Any]) -> None:
        self.replies = replies
        self.xadds: list[str] = []
        self.acked: list[str] = []

    def pipeline(self, transaction: bool = False) -> _StubPipeline:
        return _StubPipeline(self)

    async def xack(self, stream: str, group: str, *ids: str) -> int:
        self.acked.extend(ids)
        return len(ids)


@pytest.mark.parametrize("refusal", [
    OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    MovedError("3999 127.0.0.1:6381"),
    ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
])
@pytest.mark.anyio
async def test_settle_acks_only_what_is_stored_or_confirmed(refusal: Exception) -> None:
    """A refused dead-letter XADD leaves its entry unacknowledged; the others are ACKed."""
    stored = Entry("s", "1-0", b"{}")
    refused = dead_letter(Entry("s", "2-0", b"x"), c.Reason.INVALID_JSON, "bad")
    confirmed = dead_letter(Entry("s", "3-0", b"y"), c.Reason.INVALID_JSON, "bad")
    stub = _StubRedis([refusal, b"9-0"])
    # The stub answers the two commands settle sends; redis-py's Redis is a class, no protocol.
    left = await settle(stub, GROUP, "w1", [stored], [refused, confirmed])  # type: ignore[arg-type]
    assert stub.xadds == ["s:dlq", "s:dlq"]
    assert stub.acked == ["1-0", "3-0"]
    assert [d for d, _ in left] == [refused]

"""The access store's checks (tokens, access log), run against every backend.

Subclass :class:`AccessConformance` in a test module and provide an opened ``store``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from worker.api.tokens import authenticate, new_token
from worker.stores import Store
from worker.stores.access import AccessRecord, AccessStore, access_store

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


class AccessConformance:
    """Subclasses provide an opened ``store``."""

    @pytest.fixture
    def store(self) -> Store:
        raise NotImplementedError

    @pytest.fixture
    async def access(self, store: Store) -> AccessStore:
        access = access_store(store)
        await access.migrate()
        await access.migrate()
        return access

    @pytest.mark.anyio
    async def test_tokens_round_trip_and_revoke_once(self, access: AccessStore) -> None:
        """A token is found by ID with its digest, workspaces, scopes; revoked once."""
        token, record = new_token(("acme", "beta"), ("runs:read", "prompts:read"), now=T0,
                                  label="support")
        _, second = new_token(("beta",), ("runs:read",), now=T0 + timedelta(seconds=1))
        await access.add_token(record)
        await access.add_token(second)
        assert await access.get_token(record.token_id) == record
        assert await access.get_token("0" * 16) is None
        assert await access.list_tokens() == [record, second]
        who = await authenticate(access, token)
        assert who is not None
        assert who.sees("beta")
        assert not who.sees("gamma")
        assert await authenticate(access, token[:-1] + ("A" if token[-1] != "A" else "B")) \
            is None
        assert await access.revoke_token(record.token_id, T0 + timedelta(hours=1))
        assert not await access.revoke_token(record.token_id, T0 + timedelta(hours=2))
        assert not await access.revoke_token("nope", T0)
        revoked = await access.get_token(record.token_id)
        assert revoked is not None
        assert revoked.revoked_at == T0.replace(microsecond=123000) + timedelta(hours=1)
        assert await authenticate(access, token) is None

    @pytest.mark.anyio
    async def test_access_log_is_per_workspace_ordered_and_expires(
            self, access: AccessStore) -> None:
        """Records come back per workspace, oldest first, filtered by time; expiry removes
        only the workspace's records older than the horizon."""
        def rec(n: int, ws: str, minutes: int, node: str | None = "classify") -> AccessRecord:
            return AccessRecord(f"r{n:03d}", T0 + timedelta(minutes=minutes), "tok", ws,
                                "run_1", node, 1 if node else None,
                                ("input", "output") if node else ("trigger",), "store")

        await access.record_access([rec(1, "acme", 10), rec(2, "acme", 0, None),
                                    rec(3, "beta", 5)])
        await access.record_access([rec(4, "acme", 20)])
        await access.record_access([])
        got = await access.access_log("acme")
        assert [r.record_id for r in got] == ["r002", "r001", "r004"]
        assert got[0] == rec(2, "acme", 0, None).__class__(
            "r002", T0.replace(microsecond=123000), "tok", "acme", "run_1", None, None,
            ("trigger",), "store")
        assert [r.record_id for r in await access.access_log(
            "acme", since=T0 + timedelta(minutes=5), until=T0 + timedelta(minutes=20))] == \
            ["r001"]
        assert [r.record_id for r in await access.access_log("beta")] == ["r003"]
        assert await access.expire_access("acme", T0 + timedelta(minutes=15)) == 2
        assert [r.record_id for r in await access.access_log("acme")] == ["r004"]
        assert [r.record_id for r in await access.access_log("beta")] == ["r003"]

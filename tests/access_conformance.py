"""The access store's checks (tokens, access log), run against every backend.

Subclass :class:`AccessConformance` in a test module and provide an opened ``store``.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

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

    @pytest.mark.anyio
    async def test_retention_archives_access_records_before_removing_them(
            self, store: Store, access: AccessStore, tmp_path: Path) -> None:
        """Records older than the run-summary horizon go to archive segments (one per
        period, hash-chained, verified), and leave the store only once committed: killed
        after the first segment's commit and rerun, each is archived once and removed."""
        from tests import reference as ref
        from tests.store_conformance import write
        from worker import archive as arc
        from worker import retention

        await write(store, ref.reference_events("acme"))
        records = [AccessRecord(f"acme-{d:03d}", T0 - timedelta(days=d), "tok", "acme",
                                ref.RUN_ID, "classify", 1, ("input", "output"), "store")
                   for d in (5, 20, 95, 200)]
        await access.record_access(records)
        await access.record_access([AccessRecord("beta-200", T0 - timedelta(days=200),
                                                 "tok", "beta", ref.RUN_ID, None, None,
                                                 ("trigger",), "archive")])
        archive = arc.Archive.at(tmp_path / "archive")
        plan = await retention.run_retention(store, retention.Policy(), now=T0,
                                             archive=archive, apply=False,
                                             workspaces=["acme"], access=access)
        assert (plan[0].access_expired, plan[0].access_archived) == (2, 2)
        assert len(await access.access_log("acme")) == 4

        class Crash(Exception):
            pass

        def crash(step: str) -> None:  # the first access segment is committed, then...
            if step == "verify":
                raise Crash(step)

        with pytest.raises(Crash):
            await retention.run_retention(store, retention.Policy(), now=T0, archive=archive,
                                          apply=True, workspaces=["acme"], fault=crash,
                                          access=access)
        assert len(await access.access_log("acme")) == 4  # nothing removed before the end
        archive.fault = None
        (done,) = await retention.run_retention(store, retention.Policy(), now=T0,
                                                archive=archive, apply=True,
                                                workspaces=["acme"], access=access)
        assert (done.access_expired, done.access_archived) == (2, 1)
        assert [r.record_id for r in await access.access_log("acme")] == ["acme-020",
                                                                          "acme-005"]
        assert await access.access_log("beta") != []  # another workspace: untouched
        verify = archive.verify("acme")
        assert verify.ok, verify.problems
        manifests = archive.manifests("acme")
        assert [(m["period"], m["counts"]) for m in manifests] == [
            ("2025-08", {"runs": 0, "nodes": 0, "access": 1, "records": 1}),
            ("2025-11", {"runs": 0, "nodes": 0, "access": 1, "records": 1})]
        got = [AccessRecord.from_json(d) for d in arc.access_docs(archive, "acme")]
        assert got == [replace(r, at=r.at.replace(microsecond=123000))  # kept to the ms
                       for r in (records[3], records[2])]
        again = await retention.run_retention(store, retention.Policy(), now=T0,
                                              archive=archive, apply=True,
                                              workspaces=["acme"], access=access)
        assert (again[0].access_expired, len(archive.manifests("acme"))) == (0, 2)

"""The read API and viewer on a real store (SQLite and PostgreSQL): every endpoint, filter
and pagination edge, the isolation matrix, the access log, login and the pages."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from tests import reference as ref
from tests import viewer_data as vd
from tests.access_conformance import AccessConformance
from tests.dataset import make_dataset
from tests.helpers import migrated
from tests.store_conformance import write
from worker import archive as arc
from worker import explain, insights, queries, retention
from worker.api.app import ServerConfig, build_app
from worker.api.guards import SESSION_COOKIE
from worker.api.reads import Reader
from worker.api.tokens import new_token
from worker.cli import main
from worker.emitter import make_event
from worker.erasure import erase, subject_hash
from worker.shredding import MasterKey
from worker.stores import RunQuery, Store, migrate, open_store
from worker.stores.access import AccessStore, access_store

pytestmark = pytest.mark.anyio

A, B = "acme", "beta"
NOW = datetime(2026, 3, 1, tzinfo=UTC)
MASTER = bytes(range(32))
SUBJECT_KEY = b"the-subject-key-of-the-api-tests-0"


@dataclass
class Api:
    store: Store
    access: AccessStore
    client: TestClient[Any, Any]
    tokens: dict[str, str] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)
    archive_dir: Path | None = None

    async def get(self, path: str | URL, token: str | None = None, /,
                  **params: str) -> ClientResponse:
        headers = {"Authorization": f"Bearer {self.tokens.get(token, token)}"} if token else {}
        return await self.client.get(path, headers=headers, params=params or None,
                                     allow_redirects=False)

    async def json(self, path: str | URL, token: str | None, expect: int = 200, /,
                   **params: str) -> Any:
        response = await self.get(path, token, **params)
        body = await response.json()
        assert response.status == expect, body
        return body


TOKENS = {
    "a_runs": ((A,), ("runs:read",)),
    "a_prompts": ((A,), ("runs:read", "prompts:read")),
    "b_prompts": ((B,), ("runs:read", "prompts:read")),
    "ab_runs": ((A, B), ("runs:read",)),
    "revoked": ((A,), ("runs:read", "prompts:read")),
}


class ApiSuite:
    """The checks; subclasses provide ``store_url``."""

    @pytest.fixture
    def store_url(self) -> str:
        raise NotImplementedError

    @pytest.fixture
    async def api(self, store_url: str, tmp_path: Path) -> AsyncIterator[Api]:
        store = open_store(store_url)
        await store.open()
        await migrate(store)
        access = access_store(store)
        await access.migrate()
        await access.migrate()  # idempotent
        # The same run IDs in both workspaces, with different contents.
        await write(store, ref.reference_events(A))
        b_ref = ref.reference_events(B)
        b_ref[0]["trigger"]["source"] = "outlook"
        await write(store, b_ref)
        await write(store, vd.retry_failure_events(A))
        await write(store, vd.retry_failure_events(B))
        await write(store, vd.hostile_events(A))
        events, _ = make_dataset(A, runs=12, seed=3)
        await write(store, events)
        reader = Reader(store, access, arc.Archive.at(tmp_path / "archive"),
                        master=MasterKey(MASTER))
        client = TestClient(TestServer(build_app(reader, ServerConfig(secure_cookies=False))))
        await client.start_server()
        api = Api(store, access, client, archive_dir=tmp_path / "archive")
        for name, (workspaces, scopes) in TOKENS.items():
            token, record = new_token(workspaces, scopes, now=NOW, label=name)
            await access.add_token(record)
            api.tokens[name] = token
            api.ids[name] = record.token_id
        assert await access.revoke_token(api.ids["revoked"], NOW)
        try:
            yield api
        finally:
            await client.close()
            await store.close()

    # -- runs list -----------------------------------------------------------------------

    async def test_runs_list_every_filter_matches_the_runs_command(self, api: Api) -> None:
        """Each filter (and combinations) answers exactly what queries.list_runs does."""
        cases = [({}, RunQuery()), ({"workflow": "wf_billing"}, RunQuery(workflow_id="wf_billing")),
                 ({"status": "failed"}, RunQuery(status="failed")),
                 ({"triggerSource": "gmail"}, RunQuery(trigger_source="gmail")),
                 ({"since": "2026-02-16T00:00:00Z"},
                  RunQuery(since=datetime(2026, 2, 16, tzinfo=UTC))),
                 ({"until": "2026-02-16"}, RunQuery(until=datetime(2026, 2, 16, tzinfo=UTC))),
                 ({"workflow": ref.WORKFLOW_ID, "status": "completed", "limit": "2"},
                  RunQuery(workflow_id=ref.WORKFLOW_ID, status="completed", limit=2))]
        for params, query in cases:
            body = await api.json(f"/v1/workspaces/{A}/runs", "a_runs", **params)
            want = await queries.list_runs(api.store, A, query)
            assert queries.dumps(body["runs"]) == queries.dumps(want), params
            assert body["workspace"] == A
        body = await api.json(f"/v1/workspaces/{A}/runs", "a_runs", status="no-such")
        assert body == {"workspace": A, "runs": [], "nextCursor": None}

    async def test_runs_cursor_pages_cover_the_listing_once(self, api: Api) -> None:
        """limit + nextCursor walk every run once, in order; the last page has no cursor."""
        everything = await queries.list_runs(api.store, A, RunQuery(limit=1000))
        assert len(everything) == 15
        for size in (1, 4, 15, 16):
            seen: list[Any] = []
            params = {"limit": str(size)}
            while True:
                body = await api.json(f"/v1/workspaces/{A}/runs", "a_runs", **params)
                seen.extend(body["runs"])
                if body["nextCursor"] is None:
                    break
                params["cursor"] = body["nextCursor"]
            assert [r["runId"] for r in seen] == [r["runId"] for r in everything], size
        # The filters hold on every page.
        body = await api.json(f"/v1/workspaces/{A}/runs", "a_runs", limit="1",
                              workflow=ref.WORKFLOW_ID)
        body2 = await api.json(f"/v1/workspaces/{A}/runs", "a_runs", limit="5",
                               workflow=ref.WORKFLOW_ID, cursor=body["nextCursor"])
        assert {r["workflowId"] for r in body["runs"] + body2["runs"]} == {ref.WORKFLOW_ID}
        assert len(body["runs"] + body2["runs"]) == 3

    async def test_runs_bad_parameters_are_400(self, api: Api) -> None:
        """A bad filter is a 400 that says why, never a 500 or a silent default."""
        for params, message in [
            ({"limit": "0"}, "limit must be"), ({"limit": "501"}, "limit must be"),
            ({"limit": "-1"}, "limit must be"), ({"limit": "ten"}, "limit must be"),
            ({"cursor": "not-a-cursor"}, "not a cursor"), ({"since": "yesterday"}, "not a time"),
            ({"colour": "red"}, "unknown query parameter"),
            ({"workflow": f"{ref.WORKFLOW_ID}\x00"}, "control character"),
        ]:
            body = await api.json(f"/v1/workspaces/{A}/runs", "a_runs", 400, **params)
            assert message in body["error"], params
        response = await api.get(URL(f"/v1/workspaces/{A}/runs?status=a&status=b"), "a_runs")
        assert response.status == 400

    # -- one run, one node -----------------------------------------------------------------

    async def test_run_explanation_is_the_explain_document(self, api: Api) -> None:
        """runs:read gets explain --json with prompts and outputs withheld; prompts:read
        with include=prompts gets explain --json --show-prompts, and each node read is
        logged (token, workspace, run, node, attempt, fields)."""
        path = f"/v1/workspaces/{A}/runs/{ref.RUN_ID}"
        body = await api.json(path, "a_runs")
        ex = await explain.explain_run(api.store, A, ref.RUN_ID)
        assert ex is not None
        want = ex.to_json()
        for node in want["nodes"]:
            node["withheld"] = [f for f in ("input", "output") if node[f] is not None]
            node["input"] = node["output"] = None
        assert [n["withheld"] for n in body["nodes"]] == [["output"], ["input", "output"], [],
                                                          ["input", "output"]]
        assert body == queries.jsonable(want | {"withheld": ["input", "output"]})
        assert ref.PROMPT[:40] not in str(body)
        assert await api.access.access_log(A) == []
        assert (await api.json(path, "a_runs", 403, include="prompts"))["error"] == \
            "this token has no prompts:read scope"
        assert await api.access.access_log(A) == []

        full = await api.json(path, "a_prompts", include="prompts")
        ex = await explain.explain_run(api.store, A, ref.RUN_ID, show_prompts=True)
        assert ex is not None
        want = ex.to_json() | {"withheld": []}
        for node in want["nodes"]:
            node["withheld"] = []
        assert full == queries.jsonable(want)
        assert full["nodes"][1]["input"]["prompt"] == ref.PROMPT
        log = await api.access.access_log(A)
        assert sorted((r.token_id, r.workspace, r.run_id, r.node_id or "", r.attempt or 0,
                       r.fields, r.source) for r in log) == [
            (api.ids["a_prompts"], A, ref.RUN_ID, "", 0, ("trigger",), "store"),
            (api.ids["a_prompts"], A, ref.RUN_ID, "classify", 1, ("input", "output"), "store"),
            (api.ids["a_prompts"], A, ref.RUN_ID, "source", 1, ("output",), "store"),
            (api.ids["a_prompts"], A, ref.RUN_ID, "update-crm", 1, ("input", "output"),
             "store"),
        ]
        assert all(abs(r.at - datetime.now(UTC)) < timedelta(minutes=1) for r in log)
        assert await api.access.access_log(B) == []

    async def test_unknown_run_and_bad_include_are_answered(self, api: Api) -> None:
        """A run that does not exist is 404; include takes only 'prompts'."""
        await api.json(f"/v1/workspaces/{A}/runs/run_nope", "a_prompts", 404)
        await api.json(f"/v1/workspaces/{A}/runs/{ref.RUN_ID}", "a_prompts", 400,
                       include="secrets")

    async def test_node_execution_in_full(self, api: Api) -> None:
        """One node document as stored; the latest attempt by default, or the one named;
        its prompt and output only with include=prompts (and then logged)."""
        base = f"/v1/workspaces/{A}/runs/{vd.RETRY_RUN}/nodes/classify"
        nodes = {n["attempt"]: n for n in await api.store.get_nodes(A, vd.RETRY_RUN)
                 if n["nodeId"] == "classify"}
        latest = await api.json(base, "a_runs")
        want = queries.jsonable({k: v for k, v in nodes[2].items()
                                 if k not in ("input", "output")})
        assert latest == {"node": want, "withheld": ["input", "output"]}
        first = await api.json(base, "a_runs", attempt="1")
        assert first["node"]["error"] == {"type": "RateLimitError",
                                          "message": "429 from the model API", "retries": 1}
        assert first["withheld"] == ["input"]
        full = await api.json(base, "a_prompts", attempt="1", include="prompts")
        assert full == {"node": queries.jsonable(nodes[1]), "withheld": []}
        log = await api.access.access_log(A)
        assert [(r.node_id, r.attempt, r.fields) for r in log] == [("classify", 1, ("input",))]
        await api.json(base, "a_runs", 404, attempt="3")
        await api.json(base, "a_runs", 400, attempt="0")
        await api.json(f"/v1/workspaces/{A}/runs/{vd.RETRY_RUN}/nodes/nope", "a_runs", 404)

    async def test_insights_are_the_insights_document(self, api: Api) -> None:
        """The insights result of the command, for the window and threshold asked."""
        params = {"since": "2026-01-01T00:00:00Z", "until": "2026-12-31T00:00:00Z",
                  "confidenceThreshold": "0.8", "limit": "3"}
        body = await api.json(f"/v1/workspaces/{A}/insights", "a_runs", **params)
        want = await insights.compute(api.store, A, since=datetime(2026, 1, 1, tzinfo=UTC),
                                      until=datetime(2026, 12, 31, tzinfo=UTC), threshold=0.8,
                                      limit=3)
        assert body == want
        assert body["nodesScanned"] > 20
        assert len(body["lowConfidence"]["items"]) == 3
        await api.json(f"/v1/workspaces/{A}/insights", "a_runs", 400, confidenceThreshold="2")

    async def test_archived_run_through_the_archive(self, api: Api) -> None:
        """An archived and expired run is read back from the archive (explain --archive),
        with the same prompt rules and an access record that says "archive"."""
        assert api.archive_dir is not None
        archive = arc.Archive.at(api.archive_dir)
        await retention.run_retention(api.store, retention.Policy(),
                                      now=datetime(2026, 6, 1, tzinfo=UTC), archive=archive,
                                      apply=True, workspaces=[A])
        assert await api.store.get_run(A, ref.RUN_ID) is None
        await api.json(f"/v1/workspaces/{A}/runs/{ref.RUN_ID}", "a_runs", 404)
        path = f"/v1/workspaces/{A}/archive/runs/{ref.RUN_ID}"
        body = await api.json(path, "a_prompts", include="prompts")
        ex = await explain.explain_archived(archive, A, ref.RUN_ID, show_prompts=True)
        assert ex is not None
        want = ex.to_json() | {"withheld": []}
        for node in want["nodes"]:
            node["withheld"] = []
        assert body == queries.jsonable(want)
        assert body["source"].startswith("archive ")
        assert {r.source for r in await api.access.access_log(A)} == {"archive"}
        withheld = await api.json(path, "a_runs")
        assert withheld["withheld"] == ["input", "output"]
        await api.json(f"/v1/workspaces/{A}/archive/runs/run_nope", "a_runs", 404)
        # B's run of the same ID was never archived: B's token sees nothing there.
        await api.json(f"/v1/workspaces/{B}/archive/runs/{ref.RUN_ID}", "b_prompts", 404)

    async def test_archived_sealed_and_erased_runs_read_as_explain_reads_them(
            self, api: Api, store_url: str, tmp_path: Path,
            capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        """The archive route opens fields retention sealed with the run's data key, and
        reads a crypto-shredded one as erased: the same document as `explain --archive
        --show-prompts --json`; an erased field is no prompt read (no access record)."""
        assert api.archive_dir is not None
        ts = "2026-01-05T10:30:00Z"
        await write(api.store, [
            make_event("run.started", A, "wf", "r_ann", eventId="ann-s", ts=ts,
                       subjects=[subject_hash(SUBJECT_KEY, "email:ann@example.com")]),
            make_event("node.completed", A, "wf", "r_ann", eventId="ann-n", ts=ts,
                       node={"nodeId": "classify", "type": "ai",
                             "input": {"prompt": "Hi Ann"}, "output": "lead-ann",
                             "completedAt": ts}),
            make_event("run.completed", A, "wf", "r_ann", eventId="ann-e", ts=ts)])
        archive = arc.Archive.at(api.archive_dir)
        await retention.run_retention(api.store, retention.Policy(),
                                      now=datetime(2026, 6, 1, tzinfo=UTC), archive=archive,
                                      apply=True, workspaces=[A], master=MasterKey(MASTER))
        raw = b"".join(p.read_bytes() for p in api.archive_dir.glob(f"{A}/*.jsonl.gz"))
        assert raw
        assert b"lead-ann" not in raw
        master_file = tmp_path / "master.key"
        master_file.write_text(base64.b64encode(MASTER).decode())
        monkeypatch.setenv("AUDIT_ARCHIVE_MASTER_KEY_FILE", str(master_file))
        monkeypatch.setenv("AUDIT_STORE_URL", store_url)

        async def explained(run_id: str) -> Any:
            args = ["explain", run_id, "-w", A, "--archive", str(api.archive_dir),
                    "--show-prompts", "--json"]
            assert await anyio.to_thread.run_sync(main, args) == 0
            want = json.loads(capsys.readouterr().out) | {"withheld": []}
            for node in want["nodes"]:
                node["withheld"] = []
            return want

        sealed = await api.json(f"/v1/workspaces/{A}/archive/runs/{ref.RUN_ID}",
                                "a_prompts", include="prompts")
        assert sealed == await explained(ref.RUN_ID)
        classify = next(n for n in sealed["nodes"] if n["nodeId"] == "classify")
        assert "$enc" not in json.dumps(classify)
        assert classify["input"] == next(
            n for n in ref.reference_events(A) if n.get("node", {}).get("nodeId")
            == "classify")["node"]["input"]
        ann = await api.json(f"/v1/workspaces/{A}/archive/runs/r_ann", "a_prompts",
                             include="prompts")
        assert ann["nodes"][0]["output"] == "lead-ann"

        report = await erase(api.store, A, "email:ann@example.com", SUBJECT_KEY, by="dpo",
                             archive=archive)
        assert report.sealed == {"r_ann": [report.sealed["r_ann"][0]]}
        before = len(await api.access.access_log(A))
        erased = await api.json(f"/v1/workspaces/{A}/archive/runs/r_ann", "a_prompts",
                                include="prompts")
        assert erased == await explained("r_ann")
        node = erased["nodes"][0]
        assert node["input"]["erased"] is True
        assert node["output"]["erased"] is True
        assert node["input"]["at"] is not None
        assert len(await api.access.access_log(A)) == before  # nothing personal returned
        # the other runs' keys are untouched
        again = await api.json(f"/v1/workspaces/{A}/archive/runs/{ref.RUN_ID}",
                               "a_prompts", include="prompts")
        assert again == sealed

    # -- isolation ---------------------------------------------------------------------------

    async def test_isolation_matrix(self, api: Api) -> None:
        """A token of A gets 404 for everything of B (the same 404 as a missing run),
        whatever the path says; the shared run ID answers each workspace's own run."""
        paths = ["runs", f"runs/{ref.RUN_ID}", f"runs/{ref.RUN_ID}/nodes/classify",
                 "insights", f"archive/runs/{ref.RUN_ID}"]
        missing = await api.json(f"/v1/workspaces/{A}/runs/run_nope", "a_prompts", 404)
        for token in ("a_runs", "a_prompts"):
            for path in paths:
                body = await api.json(f"/v1/workspaces/{B}/{path}", token, 404)
                assert body == missing, (token, path)
                body = await api.json(f"/v1/workspaces/{B}/{path}", token, 404,
                                      include="prompts")
                assert body == missing
        a_run = await api.json(f"/v1/workspaces/{A}/runs/{ref.RUN_ID}", "ab_runs")
        b_run = await api.json(f"/v1/workspaces/{B}/runs/{ref.RUN_ID}", "ab_runs")
        assert a_run["run"]["trigger"]["source"] == "gmail"
        assert b_run["run"]["trigger"]["source"] == "outlook"
        b_only = await api.json(f"/v1/workspaces/{B}/runs/{ref.RUN_ID}", "b_prompts",
                                include="prompts")
        assert b_only["run"]["workspaceId"] == B
        assert [r.workspace for r in await api.access.access_log(B)] == [B] * 4
        assert await api.access.access_log(A) == []
        me = await api.json("/v1/workspaces", "ab_runs")
        assert me["workspaces"] == [A, B]

    async def test_path_tricks_never_reach_another_workspace(self, api: Api) -> None:
        """Encoded slashes, dot segments, NUL, case, separators and injection strings in
        the path: 404, never B's data (A's token)."""
        for raw in [
            f"/v1/workspaces/{B}%2F..%2F{A}/runs",
            f"/v1/workspaces/{A}%2F..%2F{B}/runs",
            f"/v1/workspaces/{A}/..%2F{B}/runs",
            f"/v1/workspaces/%2e%2e/{B}/runs",
            f"/v1/workspaces/{B.upper()}/runs",
            f"/v1/workspaces/{B}%00/runs",
            f"/v1/workspaces/{B}%20/runs",
            f"/v1/workspaces/{A}/runs/..%2F..%2F{B}%2Fruns%2F{ref.RUN_ID}",
            f"/v1/workspaces/{A}/runs/{ref.RUN_ID}%2F..%2F..%2F{B}",
            f"/v1/workspaces/{A}/runs/%27%20OR%20%271%27%3D%271",
            f"/v1/workspaces/{A}/runs/%7B%22%24gt%22%3A%22%22%7D",
            f"/v1/workspaces/{A};{B}/runs",
            f"/v1/workspaces/{A},{B}/runs",
            "/v1/workspaces/*/runs",
            f"/v1/workspaces/{A}%27%20OR%20%271%27%3D%271/runs",
            f"/v1/workspaces/{A}/runs/run%00",
            f"/v1/workspaces/{A}/runs/{ref.RUN_ID}%00/nodes/classify",
        ]:
            response = await api.get(URL(raw, encoded=True), "a_prompts")
            text = await response.text()
            assert response.status == 404, (raw, text)
            assert "outlook" not in text
            assert "run_" not in text

    async def test_dot_segments_are_resolved_before_the_guard(self, api: Api) -> None:
        """``/workspaces/B/../A/runs`` is A's listing (the path is normalised first), and
        ``/workspaces/A/../B/runs`` is B's, so 404 for A's token."""
        ok = await api.get(URL(f"/v1/workspaces/{B}/../{A}/runs", encoded=True), "a_runs")
        assert ok.status == 200
        assert (await ok.json())["workspace"] == A
        no = await api.get(URL(f"/v1/workspaces/{A}/../{B}/runs", encoded=True), "a_runs")
        assert no.status == 404

    async def test_injection_strings_in_filters_match_nothing(self, api: Api) -> None:
        """Filters are bound parameters: an injection string is only a value no run has."""
        for params in [{"workflow": "' OR 1=1 --"}, {"status": "completed' OR '1'='1"},
                       {"triggerSource": '{"$ne": null}'}, {"workflow": "%' OR '%'='"}]:
            body = await api.json(f"/v1/workspaces/{A}/runs", "a_runs", **params)
            assert body["runs"] == [], params

    async def test_no_token_bad_token_revoked_token_get_no_data(self, api: Api) -> None:
        """Missing, malformed, unknown, wrong-secret and revoked tokens: 401 and no data."""
        good = api.tokens["a_prompts"]
        wrong_secret = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
        other = api.tokens["revoked"]
        for token in (None, "", "nonsense", "aft_0123456789abcdef_" + "x" * 43, wrong_secret,
                      other, good + "x", good.upper()):
            for path in (f"/v1/workspaces/{A}/runs", f"/v1/workspaces/{A}/runs/{ref.RUN_ID}",
                         "/v1/workspaces"):
                response = await api.get(path, token)
                assert response.status == 401, (token, path)
                assert response.headers["WWW-Authenticate"] == "Bearer"
                assert "run_" not in await response.text()
        response = await api.client.get(f"/v1/workspaces/{A}/runs",
                                        headers={"Authorization": f"Basic {good}"})
        assert response.status == 401
        cookie = await api.client.get(f"/v1/workspaces/{A}/runs",
                                      cookies={SESSION_COOKIE: good})
        assert cookie.status == 401  # the JSON API takes bearer tokens only
        after = await api.json(f"/v1/workspaces/{A}/runs", good)
        assert after["runs"]
        assert await api.access.revoke_token(api.ids["a_prompts"], NOW)
        assert (await api.get(f"/v1/workspaces/{A}/runs", good)).status == 401

    # -- description and headers ----------------------------------------------------------

    async def test_openapi_describes_every_route(self, api: Api) -> None:
        """/v1/openapi.json needs no token and names every /v1 route the server has."""
        response = await api.client.get("/v1/openapi.json")
        doc = await response.json()
        assert doc["openapi"] == "3.1.0"
        routes = {re.sub(r"\{(\w+)\}", r"{\1}", r.resource.canonical)
                  for r in api.client.app.router.routes()
                  if r.resource is not None and r.resource.canonical.startswith("/v1/")
                  and r.method == "GET"}
        assert set(doc["paths"]) == routes
        for path, item in doc["paths"].items():
            for name in re.findall(r"\{(\w+)\}", path):
                assert name in {p["name"] for p in item["get"].get("parameters", [])}, path

    async def test_responses_carry_the_security_headers(self, api: Api) -> None:
        """no-store, nosniff, same-origin referrers, a CSP without scripts; on data and
        errors."""
        for path, token in ((f"/v1/workspaces/{A}/runs", "a_runs"),
                            (f"/v1/workspaces/{B}/runs", "a_runs"), ("/login", None)):
            response = await api.get(path, token)
            assert response.headers["Cache-Control"] == "no-store"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert response.headers["Referrer-Policy"] == "same-origin"
            assert "script-src" not in response.headers["Content-Security-Policy"]
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]

    # -- pages -----------------------------------------------------------------------------

    async def login(self, api: Api, token: str) -> None:
        form = await api.client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', await form.text())
        assert csrf is not None
        response = await api.client.post("/login", data={"csrf": csrf.group(1),
                                                         "token": api.tokens[token]},
                                         allow_redirects=False)
        assert response.status == 303
        assert response.headers["Location"] == "/workspaces"
        cookie = next(c for c in response.headers.getall("Set-Cookie")
                      if c.startswith(SESSION_COOKIE + "="))
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        assert "Secure" not in cookie  # the test server runs as --insecure-localhost

    async def test_login_sets_the_session_and_refuses_forged_posts(self, api: Api) -> None:
        """POST /login needs the form's CSRF value and a same-origin request; a bad token
        is refused; the session cookie then opens the pages (not the API)."""
        page = await api.client.get(f"/workspaces/{A}/runs", allow_redirects=False)
        assert page.status == 303
        assert page.headers["Location"] == "/login"
        forged = await api.client.post("/login", data={"csrf": "x", "token":
                                                       api.tokens["a_runs"]},
                                       allow_redirects=False)
        assert forged.status == 403
        form = await api.client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', await form.text())
        assert csrf is not None
        cross = await api.client.post("/login", data={"csrf": csrf.group(1),
                                                      "token": api.tokens["a_runs"]},
                                      headers={"Origin": "https://evil.example"},
                                      allow_redirects=False)
        assert cross.status == 403
        bad = await api.client.post("/login", data={"csrf": csrf.group(1), "token": "nope"},
                                    allow_redirects=False)
        assert bad.status in (401, 403)
        await self.login(api, "a_runs")
        page = await api.client.get(f"/workspaces/{A}/runs")
        assert page.status == 200
        assert ref.RUN_ID in await page.text()
        other = await api.client.get(f"/workspaces/{B}/runs")
        assert other.status == 404
        out = await api.client.post("/logout", allow_redirects=False)
        assert out.status == 303
        again = await api.client.get(f"/workspaces/{A}/runs", allow_redirects=False)
        assert again.status == 303

    async def test_run_page_hides_prompts_until_asked_and_logs_the_read(self, api: Api) -> None:
        """The run page holds no prompt or output; the show link reveals one node's,
        writes its access record, and needs prompts:read."""
        await self.login(api, "a_prompts")
        path = f"/workspaces/{A}/runs/{ref.RUN_ID}"
        html = await (await api.client.get(path)).text()
        assert ref.PROMPT[:30] not in html
        assert "Explicitly asks for enterprise pricing" not in html
        assert "standard-nurture" in html
        assert "support-queue" in html
        assert "claude-sonnet-4-20250514" in html
        assert "450 in / 85 out = 535" in html
        assert "salesforce.create_lead" in html
        assert "?show=classify%3A1#node-" in html
        assert await api.access.access_log(A) == []
        shown = await api.client.get(path, params={"show": "classify:1"})
        html = await shown.text()
        assert shown.status == 200
        assert "enterprise plan" in html
        assert "Explicitly asks for enterprise pricing" in html
        log = await api.access.access_log(A)
        assert [(r.node_id, r.attempt, r.fields) for r in log] == [
            ("classify", 1, ("input", "output"))]
        await self.login(api, "a_runs")
        html = await (await api.client.get(path)).text()
        assert "no prompts:read scope" in html
        denied = await api.client.get(path, params={"show": "classify:1"})
        assert denied.status == 403
        assert len(await api.access.access_log(A)) == 1

    async def test_hostile_data_renders_as_text(self, api: Api) -> None:
        """Script, HTML and terminal escapes in IDs, trigger, prompt and output are shown
        as text: no tag of theirs survives, no control character reaches the page."""
        await self.login(api, "a_prompts")
        run = vd.HOSTILE_RUN.replace("<", "%3C").replace(">", "%3E").replace("/", "%2F")
        for path in (f"/workspaces/{A}/runs/{run}?show=all", f"/workspaces/{A}/runs",
                     f"/workspaces/{A}/insights?since=2026-01-01"):
            response = await api.client.get(URL(path, encoded=True))
            assert response.status == 200, path
            html = await response.text()
            assert "<script" not in html.lower()
            assert "<img" not in html
            assert "<i>" not in html
            assert "<b>" not in html
            assert "\x1b" not in html
            assert "\x07" not in html
        response = await api.client.get(URL(f"/workspaces/{A}/runs/{run}?show=all",
                                             encoded=True))
        html = await response.text()
        assert "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;" in html
        assert "\\x1b[31mRED\\x1b[0m" in html
        assert "&lt;img src=x onerror=" in html
        assert "&lt;i&gt;n1&lt;/i&gt;" in html

    async def test_runs_page_filters_and_next_page(self, api: Api) -> None:
        """The runs page filters like the API and links the next page with the filters."""
        await self.login(api, "a_runs")
        html = await (await api.client.get(f"/workspaces/{A}/runs",
                                           params={"workflow": ref.WORKFLOW_ID,
                                                   "limit": "2"})).text()
        assert html.count('<tr class="status-') == 2
        more = re.search(r'rel="next" href="([^"]+)"', html)
        assert more is not None
        nxt = await api.client.get(f"/workspaces/{A}/runs" + more.group(1).replace("&amp;", "&"))
        text = await nxt.text()
        assert text.count('<tr class="status-') == 1
        assert 'rel="next"' not in text
        bad = await api.client.get(f"/workspaces/{A}/runs", params={"since": "soon"})
        assert bad.status == 200
        assert "not a time" in await bad.text()

    async def test_insights_page_draws_the_charts(self, api: Api) -> None:
        """Slowest nodes, confidence distribution and errors over time as inline SVG."""
        await self.login(api, "a_runs")
        html = await (await api.client.get(f"/workspaces/{A}/insights",
                                           params={"since": "2026-01-01"})).text()
        assert html.count("<svg") == 3
        for title in ("Slowest nodes (p95)", "AI confidence distribution",
                      "Errors per day by type"):
            assert f"<title>{title}</title>" in html
        assert "RateLimitError" in html


class TestSQLiteApi(ApiSuite):
    @pytest.fixture
    def store_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/api.db"


@pytest.mark.postgres
class TestPostgresApi(ApiSuite):
    @pytest.fixture
    def store_url(self, pg_url: str) -> str:
        return pg_url


@pytest.mark.postgres
class TestPostgresAccess(AccessConformance):
    """Tokens and the access log in PostgreSQL (SQLite, MongoDB: tests/unit)."""

    @pytest.fixture
    async def store(self, pg_url: str) -> AsyncIterator[Store]:
        async with migrated(open_store(pg_url)) as store:
            yield store

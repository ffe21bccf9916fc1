"""The viewer in a real browser: headless Debian Chromium logs in, loads run pages and
clicks, and the tests assert on the rendered DOM. Screenshots are kept in ``.artifacts/``
(``UPDATE_README_SCREENSHOT=1`` also refreshes docs/img/run-page.png for the README)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestServer

from tests import reference as ref
from tests import viewer_data as vd
from tests.browser import Browser, chromium_binary
from tests.store_conformance import write
from worker.api.app import ServerConfig, build_app
from worker.api.reads import Reader
from worker.api.tokens import new_token
from worker.stores import Store, migrate, open_store
from worker.stores.access import AccessStore, access_store

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".artifacts"
WS = ref.WORKSPACE

#: What the page shows of each page-level field (explain's forms: times, durations).
PAGE_FACTS = ["run_a1b2c3d4", "workspace_abc", "wf_lead_triage", "completed",
              "2026-02-15T10:30:00.000000Z", "2026-02-15T10:30:04.800000Z", "4.80 s",
              "webhook", "gmail", "Pricing for enterprise plan",
              "nodesExecuted", "aiCallsMade", "totalTokens", "535", "salesforce.create_lead",
              "claude-sonnet-4-20250514", "450 in / 85 out = 535",
              "intent == 'purchase_inquiry' AND confidence >= 0.9", "fast-track",
              "standard-nurture", "support-queue", "00Q123", "Outcome: completed"]

STATE = """(() => ({
  nodes: [...document.querySelectorAll('li.node')].map(li => [li.dataset.nodeId,
                                                              Number(li.dataset.attempt)]),
  text: document.body.innerText,
  skipped: [...document.querySelectorAll('.skipped-branch')].map(e => e.textContent),
  details: [...document.querySelectorAll('details.prompt')].map(d => [
    d.closest('li.node').dataset.nodeId, d.open,
    d.getBoundingClientRect().height > 0 && d.querySelector('pre') !== null]),
  prompts: [...document.querySelectorAll('pre.prompt-text')].map(e => e.innerText),
  outputs: [...document.querySelectorAll('pre.output')].map(e => e.innerText),
  bars: document.querySelectorAll('#timeline rect.bar').length,
  scripts: document.scripts.length,
  images: document.images.length,
  title: document.title,
}))()"""


@dataclass
class Viewer:
    url: str
    store: Store
    access: AccessStore
    token: str


@pytest.fixture
async def viewer(tmp_path: Path) -> AsyncIterator[Viewer]:
    store = open_store(f"sqlite:///{tmp_path}/viewer.db")
    await store.open()
    await migrate(store)
    access = access_store(store)
    await access.migrate()
    await write(store, ref.reference_events())
    await write(store, vd.retry_failure_events(WS))
    await write(store, vd.hostile_events(WS))
    token, record = new_token((WS,), ("runs:read", "prompts:read"),
                              now=datetime.now(UTC))
    await access.add_token(record)
    server = TestServer(build_app(Reader(store, access), ServerConfig(secure_cookies=False)),
                        host="127.0.0.1")
    await server.start_server()
    try:
        yield Viewer(str(server.make_url("")).rstrip("/"), store, access, token)
    finally:
        await server.close()
        await store.close()


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    if chromium_binary() is None:
        pytest.fail("chromium is required for the browser tests (apt-get install -y chromium)")
    async with Browser(tmp_path / "profile") as b:
        yield b


async def login(browser: Browser, viewer: Viewer) -> None:
    await browser.goto(f"{viewer.url}/login")
    await browser.act_and_load(
        f"document.querySelector('#token').value = {viewer.token!r};"
        "document.querySelector('form.login').submit()")
    where = await browser.evaluate("location.pathname + ' ' + document.body.innerText")
    assert where.startswith("/workspaces "), where


def keep(name: str, source: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(source, ARTIFACTS / name)


async def test_reference_run_page_in_chromium(viewer: Viewer, browser: Browser,
                                              tmp_path: Path) -> None:
    """The reference record's page: every field shown, nodes in execution order, the
    skipped branches listed, prompts and outputs hidden until the show link is clicked,
    and that click writes the access record."""
    await login(browser, viewer)
    await browser.goto(f"{viewer.url}/workspaces/{WS}/runs/{ref.RUN_ID}")
    state: dict[str, Any] = await browser.evaluate(STATE)
    assert state["nodes"] == [["source", 1], ["classify", 1], ["route", 1], ["update-crm", 1]]
    for fact in PAGE_FACTS:
        assert fact in state["text"], fact
    assert state["skipped"] == ["standard-nurture", "support-queue"]
    assert state["bars"] == 4
    assert state["scripts"] == 0
    # Hidden until asked for: closed, and the page holds no prompt or output at all.
    assert [d[:2] for d in state["details"]] == [["source", False], ["classify", False],
                                                 ["update-crm", False]]
    html = await browser.dom()
    assert ref.PROMPT[:40] not in html
    assert "Explicitly asks for enterprise pricing" not in html
    assert "buyer@example.com" not in html  # trigger metadata redacted
    (tmp_path / "run-page.html").write_text(html)
    keep("run-page.html", tmp_path / "run-page.html")
    await browser.screenshot(tmp_path / "run-page.png")
    keep("run-page.png", tmp_path / "run-page.png")
    if os.environ.get("UPDATE_README_SCREENSHOT"):
        shutil.copyfile(tmp_path / "run-page.png", ROOT / "docs" / "img" / "run-page.png")
    assert await viewer.access.access_log(WS) == []

    # Ask: open the classify node's details, then follow its show link.
    await browser.evaluate("document.querySelector('li.node[data-node-id=classify] "
                           "details summary').click()")
    opened = await browser.evaluate(STATE)
    assert ["classify", True] in [d[:2] for d in opened["details"]]
    assert opened["prompts"] == []
    await browser.act_and_load("document.querySelector('li.node[data-node-id=classify] "
                               "a.show-prompt').click()")
    shown: dict[str, Any] = await browser.evaluate(STATE)
    assert shown["prompts"] == [ref.PROMPT]
    assert "Explicitly asks for enterprise pricing" in shown["outputs"][0]
    assert ["classify", True, True] in shown["details"]
    log = await viewer.access.access_log(WS)
    assert [(r.run_id, r.node_id, r.attempt, r.fields) for r in log] == [
        (ref.RUN_ID, "classify", 1, ("input", "output"))]
    await browser.screenshot(tmp_path / "run-page-prompt.png")
    keep("run-page-prompt.png", tmp_path / "run-page-prompt.png")


async def test_retries_and_failure_in_chromium(viewer: Viewer, browser: Browser,
                                               tmp_path: Path) -> None:
    """A run with a retried AI node and a failed action: both attempts in order, the
    retry marked, the errors and the failed outcome shown; hostile data stays text."""
    await login(browser, viewer)
    await browser.goto(f"{viewer.url}/workspaces/{WS}/runs/{vd.RETRY_RUN}")
    state: dict[str, Any] = await browser.evaluate(STATE)
    assert state["nodes"] == [["source", 1], ["classify", 1], ["classify", 2], ["route", 1],
                              ["notify", 1]]
    for fact in ("attempt 2", "RateLimitError", "429 from the model API", "TimeoutError",
                 "slack did not answer in 1.5 s", "classify: attempts 1, 2",
                 "Outcome: failed", "confidence >= 0.9", "fast-track", "slack.post_message"):
        assert fact in state["text"], fact
    assert state["skipped"] == ["fast-track"]
    await browser.screenshot(tmp_path / "run-retries.png")
    keep("run-retries.png", tmp_path / "run-retries.png")

    await browser.goto(f"{viewer.url}/workspaces/{WS}/runs/{quote(vd.HOSTILE_RUN, safe='')}"
                       "?show=all")
    hostile: dict[str, Any] = await browser.evaluate(STATE)
    assert hostile["title"].startswith("Run run_<b>hostile</b>")
    assert hostile["scripts"] == 0
    assert hostile["images"] == 0
    assert vd.SCRIPT in hostile["prompts"][0]
    assert vd.HTML in hostile["prompts"][0]
    assert "\\x1b[31mRED\\x1b[0m" in hostile["prompts"][0]
    assert "\x1b" not in hostile["text"]
    assert hostile["nodes"][0] == ["<i>n1</i>", 1]
    await browser.screenshot(tmp_path / "run-hostile.png")
    keep("run-hostile.png", tmp_path / "run-hostile.png")


async def test_runs_and_insights_pages_in_chromium(viewer: Viewer, browser: Browser,
                                                   tmp_path: Path) -> None:
    """The runs list links every run and the insights page draws its three charts."""
    await login(browser, viewer)
    await browser.goto(f"{viewer.url}/workspaces/{WS}/runs")
    links = await browser.evaluate(
        "[...document.querySelectorAll('table.runs a')].map(a => a.textContent)")
    assert sorted(links) == sorted([ref.RUN_ID, vd.RETRY_RUN, vd.HOSTILE_RUN])
    await browser.goto(f"{viewer.url}/workspaces/{WS}/insights?since=2026-01-01")
    charts = await browser.evaluate(
        "[...document.querySelectorAll('svg.chart')].map(s => [s.querySelector('title')"
        ".textContent, s.querySelectorAll('rect').length])")
    assert [c[0] for c in charts] == ["Slowest nodes (p95)", "AI confidence distribution",
                                      "Errors per day by type"]
    assert all(count > 0 for _, count in charts)
    await browser.screenshot(tmp_path / "insights.png")
    keep("insights.png", tmp_path / "insights.png")

"""Headless Debian Chromium driven through the DevTools protocol (over aiohttp's websocket).

Just what the viewer tests need: open a page, fill and submit a form, click, read the
rendered DOM, take a full-page screenshot. Chromium runs with a fresh profile and
without any background networking (this machine has no network but loopback).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", "--mute-audio",
         "--window-size=1280,900", "--remote-debugging-port=0")


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One Chromium process and one page (a flat DevTools session)."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.proc: anyio.abc.Process | None = None
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.session: str | None = None
        self.events: list[dict[str, Any]] = []
        self._id = 0

    async def __aenter__(self) -> Browser:
        binary = chromium_binary()
        if binary is None:
            raise RuntimeError("chromium is required (apt-get install -y chromium)")
        self.profile.mkdir(parents=True, exist_ok=True)
        self.proc = await anyio.open_process(
            [binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = anyio.Path(self.profile / "DevToolsActivePort")
        with anyio.fail_after(30):
            while not await port_file.exists() or len((await port_file.read_text()).split()) < 2:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"chromium exited with {self.proc.returncode}")
                await anyio.sleep(0.05)
        port, path = (await port_file.read_text()).split()[:2]
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        target = await self.send("Target.createTarget", {"url": "about:blank"}, root=True)
        attached = await self.send("Target.attachToTarget",
                                   {"targetId": target["targetId"], "flatten": True},
                                   root=True)
        self.session = attached["sessionId"]
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.http is not None:
            await self.http.close()
        if self.proc is not None:
            self.proc.terminate()
            with anyio.move_on_after(10) as waited:
                await self.proc.wait()
            if waited.cancelled_caught:
                self.proc.kill()
                await self.proc.wait()

    async def send(self, method: str, params: dict[str, Any] | None = None, *,
                   root: bool = False) -> dict[str, Any]:
        assert self.ws is not None
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if not root:
            message["sessionId"] = self.session
        await self.ws.send_str(json.dumps(message))
        with anyio.fail_after(30):
            while True:
                reply = json.loads(await self.ws.receive_str())
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    result: dict[str, Any] = reply.get("result", {})
                    return result
                self.events.append(reply)

    async def wait_for(self, event: str) -> dict[str, Any]:
        assert self.ws is not None
        with anyio.fail_after(30):
            while True:
                for i, seen in enumerate(self.events):
                    if seen.get("method") == event:
                        return self.events.pop(i)
                self.events.append(json.loads(await self.ws.receive_str()))

    async def goto(self, url: str) -> None:
        self.events.clear()
        await self.send("Page.navigate", {"url": url})
        await self.wait_for("Page.loadEventFired")

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", {"expression": expression,
                                                      "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def act_and_load(self, expression: str) -> None:
        """Run an action that navigates (a click, a form submission) and wait for the page."""
        self.events.clear()
        await self.evaluate(expression)
        await self.wait_for("Page.loadEventFired")

    async def dom(self) -> str:
        html: str = await self.evaluate("document.documentElement.outerHTML")
        return html

    async def screenshot(self, path: Path) -> None:
        metrics = await self.send("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = await self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1280, "height": min(size["height"], 4000),
                     "scale": 1}})
        await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True)
        await anyio.Path(path).write_bytes(base64.b64decode(shot["data"]))

"""``audit-fleet serve`` as a process: TLS with a certificate, a token from the store, a
Secure session cookie, and a clean stop on SIGTERM."""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import anyio
import pytest

from tests import reference as ref
from tests.store_conformance import write
from worker.cli.serve import viewer_token
from worker.stores import migrate, open_store

pytestmark = pytest.mark.anyio


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is required to make the test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_serve_over_tls(tmp_path: Path) -> None:
    """serve starts on TLS, answers a token of the store (and 401 without it), sets a
    Secure session cookie, and exits 0 on SIGTERM."""
    db = f"sqlite:///{tmp_path}/serve.db"
    store = open_store(db)
    await store.open()
    await migrate(store)
    try:
        await write(store, ref.reference_events())
        token = await viewer_token(store, ref.WORKSPACE, label="test")
    finally:
        await store.close()
    env = dict(os.environ, AUDIT_STORE_URL=db)
    cert, key = self_signed(tmp_path)
    proc = await anyio.open_process([sys.executable, "-m", "worker", "serve", "--bind",
                                     "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key",
                                     str(key)], env=env)
    try:
        assert proc.stdout is not None
        line = b""
        with anyio.fail_after(30):
            while b"\n" not in line:
                line += await proc.stdout.receive()
        found = re.search(rb"https://127\.0\.0\.1:(\d+)", line)
        assert found is not None, line
        base = f"https://127.0.0.1:{int(found.group(1))}"
        tls = ssl.create_default_context(cafile=str(cert))
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP address host
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls),
                                         cookie_jar=jar) as http:
            async with http.get(f"{base}/v1/workspaces/{ref.WORKSPACE}/runs/{ref.RUN_ID}",
                                headers={"Authorization": f"Bearer {token}"}) as response:
                assert response.status == 200
                body = await response.json()
                assert body["run"]["runId"] == ref.RUN_ID
                assert body["withheld"] == ["input", "output"]
            async with http.get(f"{base}/v1/workspaces/{ref.WORKSPACE}/runs") as response:
                assert response.status == 401
            async with http.get(f"{base}/login") as form:
                csrf = re.search(r'name="csrf" value="([^"]+)"', await form.text())
                assert csrf is not None
            async with http.post(f"{base}/login", data={"csrf": csrf.group(1), "token": token},
                                 allow_redirects=False) as login:
                assert login.status == 303
                cookie = next(c for c in login.headers.getall("Set-Cookie")
                              if c.startswith("af_session="))
                assert "Secure" in cookie
                assert "HttpOnly" in cookie
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

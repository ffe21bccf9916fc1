"""Signed events: the wire contract, the keyring, and the worker's verification."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from tests.helpers import MemoryStore, dlq_entries, pending_count
from worker import explain
from worker.cli.explain import render
from worker.constants import Reason
from worker.consumer import Worker
from worker.emitter import AuditEmitter, make_event
from worker.errors import ConfigError
from worker.redisio import Entry
from worker.settings import Settings
from worker.signing import Keyring, SignaturePolicy, SigningError, sign, verify
from worker.writer import prepare

SECRET_A1 = b"A" * 32
SECRET_A2 = b"a2-secret-rotated-0123456789abcd"
SECRET_B1 = b"B" * 32


def b64(secret: bytes) -> str:
    return base64.b64encode(secret).decode()


#: Workers' keyring: workspace A in rotation (k1 and k2 valid), workspace B with its own k1.
WORKER_KEYS = {"ws_a": {"k1": b64(SECRET_A1), "k2": b64(SECRET_A2)},
               "ws_b": {"k1": b64(SECRET_B1)}}


def keyring(keys: dict[str, dict[str, str]] | None = None) -> Keyring:
    return Keyring.from_json(json.dumps(WORKER_KEYS if keys is None else keys))


def payload(workspace: str = "ws_a", run_id: str = "r1", event_id: str = "e1") -> bytes:
    return json.dumps(make_event("run.started", workspace, "wf", run_id, eventId=event_id,
                                 ts="2026-02-15T10:30:00Z"), separators=(",", ":")).encode()


# -- the wire contract -----------------------------------------------------------------------

def test_sig_is_key_id_and_hex_hmac_sha256_of_the_event_bytes() -> None:
    """The test vector of docs/events.md: sig = keyId ":" hex(HMAC-SHA256(secret, bytes))."""
    body = b'{"v":1,"eventId":"e-1","type":"run.started","workspaceId":"workspace_abc",' \
           b'"workflowId":"wf_lead_triage","runId":"run_a1b2c3d4","ts":"2026-02-15T10:30:00Z"}'
    secret = base64.b64decode("c2VjcmV0LWtleS1vZi13b3Jrc3BhY2VfYWJjLTAx")
    assert secret == b"secret-key-of-workspace_abc-01"
    assert sign(body, "2026-01", secret) == (
        b"2026-01:38c519847f9364253b9bc1fd52250bd3b13516ca535cffd3224e865cc9e18c1f")
    docs = (Path(__file__).parents[2] / "docs" / "events.md").read_text()
    assert "2026-01:38c519847f9364253b9bc1fd52250bd3b13516ca535cffd3224e865cc9e18c1f" in docs
    assert "c2VjcmV0LWtleS1vZi13b3Jrc3BhY2VfYWJjLTAx" in docs


def test_verify_valid_missing_wrong_rotated_and_cross_workspace() -> None:
    """Each case gets its own verdict; only a matching key of the named workspace passes."""
    ring = keyring()
    body = payload("ws_a")
    ok = verify(ring, body, sign(body, "k1", SECRET_A1), required=True)
    assert (ok.reason, ok.key_id, ok.workspace) == (None, "k1", "ws_a")
    rotated = verify(ring, body, sign(body, "k2", SECRET_A2), required=True)
    assert (rotated.reason, rotated.key_id) == (None, "k2")
    assert verify(ring, body, None, required=True).reason == Reason.SIGNATURE_MISSING
    assert verify(ring, body, None, required=False).ok
    wrong = verify(ring, body, sign(body, "k1", SECRET_B1), required=True)
    assert wrong.reason == Reason.SIGNATURE_INVALID
    assert verify(ring, body, sign(body, "k9", SECRET_A1), required=True).reason \
        == Reason.SIGNATURE_UNKNOWN_KEY
    # signed with A's key, naming B: B's k1 does not verify it, A's k2 is unknown in B
    forged = payload("ws_b")
    assert verify(ring, forged, sign(forged, "k1", SECRET_A1), required=True).reason \
        == Reason.SIGNATURE_INVALID
    assert verify(ring, forged, sign(forged, "k2", SECRET_A2), required=True).reason \
        == Reason.SIGNATURE_UNKNOWN_KEY
    # one changed byte of the event breaks the signature
    sig = sign(body, "k1", SECRET_A1)
    assert verify(ring, body.replace(b"r1", b"r2"), sig, required=True).reason \
        == Reason.SIGNATURE_INVALID
    for bad in (b"k1", b"k1:xyz", b":" + sig.split(b":")[1], b"k 1:" + sig.split(b":")[1]):
        assert verify(ring, body, bad, required=True).reason == Reason.SIGNATURE_INVALID
    # upper-case hex is the same digest
    assert verify(ring, body, b"k1:" + sig.split(b":")[1].upper(), required=True).ok


def test_keyring_file_errors_and_repr_never_show_a_secret(tmp_path: Path) -> None:
    """Bad keyrings fail at start naming the place; no secret in an error or a repr."""
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(WORKER_KEYS))
    settings = Settings(signing_keys_file=str(path), require_signature=True, metrics_port=0)
    assert settings.keyring is not None
    assert settings.keyring.secret("ws_a", "k2") == SECRET_A2
    shown = repr(settings) + str(settings.keyring)
    for secret in (SECRET_A1, SECRET_A2, SECRET_B1):
        assert secret.decode() not in shown
        assert b64(secret) not in shown
    assert repr(settings.keyring) == "Keyring(2 workspaces, 3 keys)"
    cases: list[Any] = [
        "not json", [], {"ws a": {"k1": b64(SECRET_A1)}}, {"ws_a": {}},
        {"ws_a": {"k:1": b64(SECRET_A1)}}, {"ws_a": {"k1": "***not-base64***"}},
        {"ws_a": {"k1": b64(b"short")}}, {"ws_a": {"k1": 7}},
    ]
    for case in cases:
        path.write_text(case if isinstance(case, str) else json.dumps(case))
        with pytest.raises(ConfigError) as info:
            Settings(signing_keys_file=str(path), metrics_port=0)
        assert "AUDIT_SIGNING_KEYS_FILE" in str(info.value)
        assert b64(SECRET_A1) not in str(info.value)
    with pytest.raises(ConfigError, match="AUDIT_SIGNING_KEYS_FILE"):
        Settings(signing_keys_file=str(tmp_path / "missing.json"), metrics_port=0)
    with pytest.raises(ConfigError, match="AUDIT_REQUIRE_SIGNATURE"):
        Settings(require_signature=True, metrics_port=0)
    env = {"AUDIT_SIGNING_KEYS_FILE": str(path), "AUDIT_REQUIRE_SIGNATURE": "on"}
    path.write_text(json.dumps(WORKER_KEYS))
    from_env = Settings.from_env(env)
    assert from_env.require_signature
    assert from_env.keyring is not None


def test_prepare_verifies_before_decoding() -> None:
    """A bad signature is the verdict even when the payload is also invalid; a valid
    one is carried to the decoded event as its key id."""
    policy = SignaturePolicy(keyring(), required=True)
    good = payload("ws_a", event_id="good")
    broken = b'{"v":1,"workspaceId":"ws_a","eventId":"x"}'  # schema violation
    entries = [
        Entry("s", "1-0", good, sig=sign(good, "k2", SECRET_A2)),
        Entry("s", "2-0", broken, sig=b"k1:" + b"0" * 64),
        Entry("s", "3-0", broken, sig=sign(broken, "k1", SECRET_A1)),
        Entry("s", "4-0", b"{not json", sig=sign(b"{not json", "k1", SECRET_A1)),
    ]
    valid, dead = prepare(entries, 1 << 20, 5, policy)
    assert [(src, key_id) for src, _, key_id in valid] == [(0, "k2")]
    assert [(d.source_id, d.reason) for d in dead] == [
        ("2-0", Reason.SIGNATURE_INVALID), ("3-0", Reason.SCHEMA), ("4-0", Reason.INVALID_JSON)]


def test_duplicate_workspace_keys_cannot_split_the_verdict() -> None:
    """JSON naming two workspaces is checked against the one the decoder stores."""
    policy = SignaturePolicy(keyring(), required=True)
    body = payload("ws_b").replace(b'"workspaceId":"ws_b"',
                                   b'"workspaceId":"ws_a","workspaceId":"ws_b"')
    for key_id, secret in (("k1", SECRET_A1), ("k1", SECRET_B1)):
        valid, dead = prepare([Entry("s", "1-0", body, sig=sign(body, key_id, secret))],
                              1 << 20, 5, policy)
        stored = [doc["workspaceId"] for _, doc, _ in valid]
        assert stored in ([], ["ws_b"])
        assert (stored == ["ws_b"]) == (secret == SECRET_B1)
        assert len(valid) + len(dead) == 1


def test_emitter_signs_with_the_last_key_of_the_workspace() -> None:
    """The SDK signs with the workspace's active key, and refuses a workspace it has none of."""
    emitter = AuditEmitter(aioredis.Redis(), ["s"], keyring=keyring())
    event = make_event("run.started", "ws_a", "wf", "r1")
    fields = emitter.fields(event)
    assert fields["sig"] == sign(fields["event"], "k2", SECRET_A2)
    with pytest.raises(SigningError):
        emitter.fields(make_event("run.started", "ws_c", "wf", "r1"))


# -- the worker, on real Redis ---------------------------------------------------------------




def worker_settings(stream: str, redis_url: str, tmp_path: Path, **kw: Any) -> Settings:
    path = tmp_path / "worker-keys.json"
    path.write_text(json.dumps(WORKER_KEYS))
    base: dict[str, Any] = dict(
        redis_url=redis_url, streams=(stream,), metrics_port=0, block_ms=50, burst=True,
        batch_size=50, claim_idle_ms=200, reclaim_interval_s=0.1, max_deliveries=3,
        consumer="w1", shutdown_grace_s=5, signing_keys_file=str(path), require_signature=True)
    base.update(kw)
    return Settings(**base)


@pytest.mark.anyio
@pytest.mark.redis
async def test_worker_stores_signed_and_dead_letters_forged(
    redis_client: aioredis.Redis, stream: str, redis_url: str, tmp_path: Path
) -> None:
    """Valid and rotated signatures are stored with their key ids; missing, unknown,
    wrong and cross-workspace ones are dead-lettered with their reason, sig kept."""
    producer_a = AuditEmitter(redis_client, [stream],
                              keyring=keyring({"ws_a": {"k1": b64(SECRET_A1)}}))
    rotated_a = AuditEmitter(redis_client, [stream], keyring=keyring(
        {"ws_a": {"k1": b64(SECRET_A1), "k2": b64(SECRET_A2)}}))
    unsigned = AuditEmitter(redis_client, [stream])
    ts = "2026-02-15T10:30:00Z"
    await producer_a.emit(make_event("run.started", "ws_a", "wf", "r1", eventId="a1", ts=ts))
    await rotated_a.emit(make_event("node.completed", "ws_a", "wf", "r1", eventId="a2", ts=ts,
                                    node={"nodeId": "n1", "type": "ai", "input": "hi"}))
    await rotated_a.emit(make_event("run.completed", "ws_a", "wf", "r1", eventId="a3", ts=ts))
    # the forgery: A's producer writes an event that names workspace B
    forged = payload("ws_b", run_id="victim", event_id="forged")
    await producer_a.emit_raw(stream, forged, sign(forged, "k1", SECRET_A1))
    await unsigned.emit(make_event("run.started", "ws_b", "wf", "r2", eventId="b1", ts=ts))
    other = payload("ws_a", run_id="r3", event_id="a4")
    await unsigned.emit_raw(stream, other, sign(other, "k7", SECRET_A1))
    store = MemoryStore()
    with capture_logs() as logs:
        worker = Worker(worker_settings(stream, redis_url, tmp_path), store, redis_client)
        with anyio.fail_after(30):
            await worker.run()

    assert await pending_count(redis_client, stream, "audit-writers") == 0
    run = await store.get_run("ws_a", "r1")
    assert run is not None
    assert run["signedBy"] == ["k1:a1", "k2:a3"]
    assert [n["signedBy"] for n in await store.get_nodes("ws_a", "r1")] == ["k2"]
    assert await store.get_run("ws_b", "victim") is None
    assert await store.get_run("ws_b", "r2") is None
    dead = await dlq_entries(redis_client, stream)
    assert [(d["reason"], json.loads(d["event"])["eventId"]) for d in dead] == [
        (Reason.SIGNATURE_INVALID, "forged"), (Reason.SIGNATURE_MISSING, "b1"),
        (Reason.SIGNATURE_UNKNOWN_KEY, "a4")]
    assert dead[0]["sig"] == sign(forged, "k1", SECRET_A1).decode()
    assert "ws_b" in dead[0]["error"]
    assert "k1" in dead[0]["error"]
    logged = json.dumps([str(entry) for entry in logs])
    for secret in (SECRET_A1, SECRET_A2, SECRET_B1):
        assert secret.decode() not in logged
        assert b64(secret) not in logged
    ex = explain.build("ws_a", "r1", run, await store.get_nodes("ws_a", "r1"))
    assert ex.to_json()["run"]["signedBy"] == [{"keyId": "k1", "eventId": "a1"},
                                               {"keyId": "k2", "eventId": "a3"}]
    assert ex.to_json()["nodes"][0]["signedBy"] == "k2"
    text = render(ex)
    assert "Signed: key k1 (a1); key k2 (a3)" in text
    assert "signed by key k2" in text


@pytest.mark.anyio
@pytest.mark.redis
async def test_keyring_without_requirement_accepts_unsigned_but_checks_signed(
    redis_client: aioredis.Redis, stream: str, redis_url: str, tmp_path: Path
) -> None:
    """Migration mode: unsigned events are stored unsigned; a bad signature is still refused."""
    emitter = AuditEmitter(redis_client, [stream])
    ts = "2026-02-15T10:30:00Z"
    await emitter.emit(make_event("run.started", "ws_a", "wf", "r1", eventId="u1", ts=ts))
    forged = payload("ws_b", run_id="r2", event_id="f1")
    await emitter.emit_raw(stream, forged, sign(forged, "k1", SECRET_A1))
    store = MemoryStore()
    worker = Worker(worker_settings(stream, redis_url, tmp_path, require_signature=False),
                    store, redis_client)
    with anyio.fail_after(30):
        await worker.run()
    run = await store.get_run("ws_a", "r1")
    assert run is not None
    assert "signedBy" not in run
    assert [d["reason"] for d in await dlq_entries(redis_client, stream)] == [
        Reason.SIGNATURE_INVALID]


@pytest.mark.anyio
@pytest.mark.redis
async def test_dlq_replay_keeps_the_signature(
    redis_client: aioredis.Redis, stream: str, redis_url: str, tmp_path: Path
) -> None:
    """An entry dead-lettered for a key the workers did not have yet is stored, signed,
    once it is replayed after the key was added (the sig travels with the dead letter)."""
    from worker import dlq

    new_key = {"ws_a": {"k3": b64(b"k3-secret-not-yet-rolled-out-xx")}}
    emitter = AuditEmitter(redis_client, [stream], keyring=keyring(new_key))
    await emitter.emit(make_event("run.started", "ws_a", "wf", "r1", eventId="e1",
                                  ts="2026-02-15T10:30:00Z"))
    store = MemoryStore()
    with anyio.fail_after(30):
        await Worker(worker_settings(stream, redis_url, tmp_path), store, redis_client).run()
    assert [d["reason"] for d in await dlq_entries(redis_client, stream)] == [
        Reason.SIGNATURE_UNKNOWN_KEY]
    result = await dlq.replay(redis_client, await dlq.find(redis_client, [stream]))
    assert len(result.replayed) == 1
    rolled = tmp_path / "rolled.json"
    rolled.write_text(json.dumps({**WORKER_KEYS, "ws_a": {**WORKER_KEYS["ws_a"],
                                                          **new_key["ws_a"]}}))
    settings = worker_settings(stream, redis_url, tmp_path).with_(
        keyring=Keyring.load(rolled))
    with anyio.fail_after(30):
        await Worker(settings, store, redis_client).run()
    assert await dlq_entries(redis_client, stream) == []
    run = await store.get_run("ws_a", "r1")
    assert run is not None
    assert run["signedBy"] == ["k3:e1"]

"""The Redis edge without a server: error translation, reply parsing, slots, URLs, shards."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis import exceptions as rx

from worker import errors
from worker.emitter import shard_index
from worker.errors import ConfigError
from worker.redisclient import mode_of, parse_sentinel_url
from worker.redisio import (
    Entry,
    EntryFields,
    check_slots,
    entries_from_read,
    parse_autoclaim_reply,
    parse_read_reply,
    translate,
    translated,
)
from worker.settings import Settings, expand_streams


@pytest.mark.parametrize(("exc", "expected", "kind"), [
    (rx.ConnectionError("Connection reset by peer"), errors.RedisUnavailable, "connection"),
    (rx.TimeoutError("Timeout reading"), errors.RedisUnavailable, "timeout"),
    (rx.BusyLoadingError("Redis is loading the dataset"), errors.RedisUnavailable, "loading"),
    (ConnectionResetError(104, "reset"), errors.RedisUnavailable, "connection"),
    (rx.ClusterDownError("The cluster is down"), errors.RedisUnavailable, "cluster"),
    (rx.TryAgainError("Multiple keys request during rehashing"), errors.RedisUnavailable,
     "cluster"),
    (rx.MasterDownError("Link with MASTER is down"), errors.RedisUnavailable, "cluster"),
    (rx.ReadOnlyError("You can't write against a read only replica."),
     errors.RedisUnavailable, "readonly"),
    (rx.ResponseError("CLUSTERDOWN Hash slot not served"), errors.RedisUnavailable, "cluster"),
    (rx.ResponseError("MOVED 3999 127.0.0.1:6381"), errors.RedisUnavailable, "moved"),
    (rx.SlotNotCoveredError("slot 7 not covered"), errors.RedisUnavailable, "cluster"),
    (rx.ResponseError("NOGROUP No such key 'x' or consumer group 'g'"), errors.GroupMissing,
     "nogroup"),
    (rx.ResponseError("UNBLOCKED the stream key no longer exists"), errors.GroupMissing,
     "nogroup"),
    (rx.ResponseError("no such key"), errors.StreamMissing, "nogroup"),
    (rx.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
     errors.RedisUnavailable, "oom"),
    (rx.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
     errors.RedisRefused, "wrongtype"),
])
def test_redis_errors_become_the_projects_own(exc: Exception, expected: type, kind: str) -> None:
    """Each redis-py failure maps to exactly one project error class and metric kind;
    cluster failovers and slot moves are "unavailable" (retried like a lost connection)."""
    got = translate(exc)
    assert type(got) is expected
    assert got is not None
    assert got.kind == kind


def test_other_errors_pass_through_the_edge_unchanged() -> None:
    """BUSYGROUP (read by ensure_group) and non-Redis errors are not reinterpreted."""
    busy = rx.ResponseError("BUSYGROUP Consumer Group name already exists")
    assert translate(busy) is None
    assert translate(ValueError("not Redis")) is None
    with pytest.raises(rx.ResponseError, match="BUSYGROUP"), translated():
        raise busy
    with pytest.raises(errors.GroupMissing), translated():
        raise rx.ResponseError("NOGROUP No such key")


@pytest.mark.anyio
async def test_a_connection_closed_while_in_use_is_a_connection_error() -> None:
    """redis-py's leaked ``'NoneType' object has no attribute 'writelines'`` (a connection
    written to while a dead cluster node's connection is being closed: redis/redis-py#4287)
    is "Redis unavailable", so the loop retries; the same error raised elsewhere is not."""
    connection = aioredis.Connection()
    assert connection._writer is None  # never connected: as after the close
    with pytest.raises(errors.RedisUnavailable) as info, translated():
        await connection._send_packed_command([b"PING"])
    assert info.value.kind == "connection"
    with pytest.raises(AttributeError), translated():
        None.writelines([])  # type: ignore[attr-defined]  # ours, not redis-py's


def test_xreadgroup_replies_parse_from_resp2_and_resp3_raw_and_parsed() -> None:
    """The same entries come out of every reply shape: raw RESP2 and RESP3 wire replies,
    redis-py's default parse, and the edge's registered callback on either wire shape."""
    want = [Entry("s", "1-0", b"a"), Entry("s", "1-1", None)]
    resp2_raw = [[b"s", [[b"1-0", [b"event", b"a"]], [b"1-1", [b"other", b"x"]]]]]
    resp2_parsed = [[b"s", [(b"1-0", {b"event": b"a"}), (b"1-1", {b"other": b"x"})]]]
    resp3_raw = {b"s": [[b"1-0", [b"event", b"a"]], [b"1-1", [b"other", b"x"]]]}
    resp3_parsed = {b"s": [[(b"1-0", {b"event": b"a"}), (b"1-1", {b"other": b"x"})]]}
    decoded = {"s": [[("1-0", {"event": "a"}), ("1-1", {"other": "x"})]]}
    for reply in (resp2_raw, resp2_parsed, resp3_parsed, decoded,
                  parse_read_reply(resp2_raw), parse_read_reply(resp3_raw)):
        assert entries_from_read(reply) == want, reply
    assert entries_from_read(None) == []
    assert entries_from_read(parse_read_reply(None)) == []
    assert entries_from_read([]) == []


def test_the_read_callback_keeps_a_repeated_event_field() -> None:
    """Two ``event`` fields in one entry survive the registered callback (RESP2 and RESP3),
    so the entry is seen as ambiguous; its fields still read as redis-py's dict."""
    fields = [b"event", b"x", b"other", b"o", b"event", b"y"]
    for wire in ([[b"s", [[b"2-1", fields]]]], {b"s": [[b"2-1", fields]]}):
        parsed = parse_read_reply(wire)
        (entry,) = entries_from_read(parsed)
        assert (entry.payload, entry.extra_payloads) == (b"x", (b"y",))
        inner = parsed[0][1][0][1] if isinstance(parsed, list) else parsed[b"s"][0][0][1]
        assert isinstance(inner, EntryFields)
        assert inner == {b"event": b"y", b"other": b"o"}


def test_the_autoclaim_callback_keeps_a_repeated_event_field() -> None:
    """XAUTOCLAIM replies (the same wire shape on RESP2 and RESP3: cursor, entries, deleted
    IDs) keep every raw field pair, so a reclaimed entry with two ``event`` fields is
    ambiguous as it is when read; deleted entries (nil fields) stay recognisable."""
    fields = [b"event", b"x", b"other", b"o", b"event", b"y"]
    for wire in ([b"0-0", [[b"2-1", fields], [b"2-2", None]], [b"1-9"]],  # Redis 7
                 [b"0-0", [[b"2-1", list(fields)], [b"2-2", None]]]):  # 6.2: no deleted list
        cursor, entries, *deleted = parse_autoclaim_reply(wire)
        assert (cursor, deleted) == (b"0-0", wire[2:])
        (entry_id, inner), (gone_id, gone) = entries
        assert isinstance(inner, EntryFields)
        assert (gone_id, gone) == (b"2-2", None)
        (entry,) = entries_from_read([("s", [(entry_id, inner)])])
        assert (entry.id, entry.payload, entry.extra_payloads) == ("2-1", b"x", (b"y",))
        assert inner == {b"event": b"y", b"other": b"o"}
    assert parse_autoclaim_reply([b"0-0", [b"1-1", b"1-2"], []], parse_justid=True) == [
        b"1-1", b"1-2"]


def test_slot_check_refuses_a_dead_letter_key_in_another_slot() -> None:
    """Hash-tagged shards pass; an untagged name (its :dlq hashes elsewhere) is refused."""
    check_slots(expand_streams("audit:events:{0..7}"))
    with pytest.raises(ConfigError) as info:
        check_slots(("audit:events",))
    message = str(info.value)
    assert "\n" not in message
    assert "'audit:events:dlq'" in message
    assert "hash tag" in message


def test_stream_ranges_expand_to_hash_tagged_shards() -> None:
    """``{0..3}`` gives four shards; comma lists and mixed forms work; bad ranges fail."""
    assert expand_streams("audit:events:{0..3}") == (
        "audit:events:{0}", "audit:events:{1}", "audit:events:{2}", "audit:events:{3}")
    assert expand_streams("a:{0..1}, b") == ("a:{0}", "a:{1}", "b")
    assert Settings.from_env({"AUDIT_STREAM": "x:{0..2}"}).streams == ("x:{0}", "x:{1}", "x:{2}")
    with pytest.raises(ConfigError):
        expand_streams("x:{3..1}")
    with pytest.raises(ConfigError):
        Settings(streams=("a", "a"))


def test_sentinel_urls_carry_tls_options_and_refuse_unknown_ones() -> None:
    """``rediss+sentinel://…?ssl_ca_certs=…`` keeps redis-py's TLS options (for the
    Sentinels and the master alike); an unknown option or TLS options on a plain
    ``redis+sentinel://`` URL are refused instead of ignored."""
    u = parse_sentinel_url("rediss+sentinel://h1/m/0?ssl_ca_certs=/ca.crt&ssl_check_hostname="
                           "false&sentinel_username=s&sentinel_password=p")
    assert u.tls_options == (("ssl_ca_certs", "/ca.crt"), ("ssl_check_hostname", "false"))
    assert (u.sentinel_username, u.sentinel_password) == ("s", "p")
    for bad in ("rediss+sentinel://h1/m?ssl_ca_cert=/ca.crt",
                "redis+sentinel://h1/m?ssl_ca_certs=/ca.crt"):
        with pytest.raises(ConfigError):
            parse_sentinel_url(bad)


def test_sentinel_urls_parse_hosts_master_db_and_credentials() -> None:
    """``redis+sentinel://user:pw@h1:26379,h2:26380/mymaster/2`` gives every part."""
    u = parse_sentinel_url("rediss+sentinel://app:s%3Acret@h1:26379,h2:26380/mymaster/2"
                           "?sentinel_password=sp")
    assert u.hosts == (("h1", 26379), ("h2", 26380))
    assert (u.master, u.db, u.username, u.password, u.tls) == ("mymaster", 2, "app", "s:cret",
                                                               True)
    assert u.sentinel_password == "sp"
    assert parse_sentinel_url("redis+sentinel://h1/m").hosts == (("h1", 26379),)
    for bad in ("redis+sentinel://h1:26379", "redis+sentinel://h1:x/m",
                "redis+sentinel://h1/m/x", "redis://h1/m"):
        with pytest.raises(ConfigError):
            parse_sentinel_url(bad)


def test_mode_and_url_must_agree() -> None:
    """auto picks Sentinel for a +sentinel URL; contradictions are refused at start."""
    assert mode_of("redis+sentinel://h/m", "auto") == "sentinel"
    assert mode_of("redis://h", "auto") == "auto"
    assert mode_of("rediss://h", "cluster") == "cluster"
    for url, mode in (("redis://h", "sentinel"), ("redis+sentinel://h/m", "cluster"),
                      ("redis://h", "shards"), ("http://h", "auto")):
        with pytest.raises(ConfigError):
            mode_of(url, mode)
    with pytest.raises(ConfigError):
        Settings(redis_mode="sentinel")


def test_shard_of_a_run_is_crc32_modulo_the_shard_count() -> None:
    """The documented algorithm and its pinned vector (docs/events.md, "Sharding")."""
    assert shard_index("run_42", 8) == 4
    assert shard_index("run_42", 4) == 0
    assert shard_index("a1b2c3", 8) == 6
    assert shard_index("run_42", 1) == 0
    assert shard_index("rün-ü", 3) == __import__("zlib").crc32("rün-ü".encode()) % 3

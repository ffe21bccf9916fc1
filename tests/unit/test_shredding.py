"""Sealing archived personal fields: AES-256-GCM bound to workspace, run, node and field."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from worker.errors import ConfigError
from worker.shredding import MasterKey, Opener, SealError, load_master_key, seal
from worker.stores.base import StoredKey

MASTER = MasterKey(bytes(range(32)))


def node(run_id: str, key: str = "classify#1") -> dict[str, object]:
    return {"runId": run_id, "nodeKey": key, "input": {"prompt": f"secret of {run_id}"},
            "output": "lead", "error": None, "status": "completed"}


def sealed_pair() -> tuple[Opener, dict[str, Any], dict[str, Any], StoredKey]:
    row_a, key_a = MASTER.new_key("ws1", "a")
    row_b, key_b = MASTER.new_key("ws1", "b")
    a = seal("ws1", "node", node("a"), row_a.key_id, key_a)
    b = seal("ws1", "node", node("b"), row_b.key_id, key_b)
    return Opener("ws1", MASTER, [row_a, row_b]), a, b, row_a


def test_sealed_fields_round_trip_and_nothing_else_changes() -> None:
    opener, a, _, row = sealed_pair()
    assert a["input"] != {"prompt": "secret of a"}
    assert "secret" not in str(a)
    assert a["error"] is None
    assert a["status"] == "completed"
    assert isinstance(a["input"], dict)
    assert a["input"]["kid"] == row.key_id
    assert len(base64.b64decode(a["input"]["n"])) == 12
    assert opener.open("node", a) == node("a")
    again = seal("ws1", "node", node("a"), row.key_id, MASTER.unwrap("ws1", row))
    assert again["input"] != a["input"]  # a fresh nonce per field


def test_a_ciphertext_moved_to_another_record_or_field_fails_authentication() -> None:
    opener, a, b, _ = sealed_pair()
    moved = dict(b, input=dict(a["input"], kid=b["input"]["kid"]))
    with pytest.raises(SealError, match="does not authenticate"):
        opener.open("node", moved)
    swapped = dict(a, input=a["output"])  # output's ciphertext as the input
    with pytest.raises(SealError, match="does not authenticate"):
        opener.open("node", swapped)
    other_node = dict(a, nodeKey="other#1")
    with pytest.raises(SealError, match="does not authenticate"):
        opener.open("node", other_node)
    other_ws = Opener("ws2", MASTER, opener.rows.values())
    with pytest.raises(SealError, match="does not unwrap"):
        other_ws.open("node", a)


def test_a_shredded_or_missing_key_reads_as_erased() -> None:
    _, a, _, row = sealed_pair()
    at = datetime(2027, 6, 1, tzinfo=UTC)
    gone = StoredKey(row.run_id, row.key_id, None, row.created_at, at)
    opened = Opener("ws1", MASTER, [gone]).open("node", a)
    assert opened["input"] == {"erased": True, "at": "2027-06-01T00:00:00+00:00"}
    assert opened["output"] == {"erased": True, "at": "2027-06-01T00:00:00+00:00"}
    missing = Opener("ws1", MASTER, []).open("node", a)
    assert missing["input"]["erased"] is True
    assert missing["input"]["at"] is None


def test_another_master_key_does_not_unwrap() -> None:
    opener, a, _, _ = sealed_pair()
    wrong = Opener("ws1", MasterKey(bytes(32)), opener.rows.values())
    with pytest.raises(SealError, match="another master key"):
        wrong.open("node", a)
    assert repr(MASTER) == "MasterKey(<secret>)"  # the key bytes never show


def test_the_master_key_file_holds_base64_of_32_bytes(tmp_path: Path) -> None:
    good = tmp_path / "k"
    good.write_text(base64.b64encode(bytes(range(32))).decode() + "\n")
    assert load_master_key(str(good)) == bytes(range(32))
    short = tmp_path / "s"
    short.write_text(base64.b64encode(bytes(16)).decode())
    with pytest.raises(ConfigError, match="must hold 32 bytes"):
        load_master_key(str(short))
    with pytest.raises(ConfigError, match="cannot read"):
        load_master_key(str(tmp_path / "none"))

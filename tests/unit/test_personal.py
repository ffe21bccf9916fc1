"""The personal field paths: parsing and validation at the edge, and the pure operations."""

from __future__ import annotations

from typing import Any

import pytest

from worker import personal
from worker.errors import ConfigError
from worker.personal import PersonalFields
from worker.settings import Settings
from worker.shredding import MasterKey, Opener, holds_personal, seal, sealed_kids


def test_defaults_and_configured_paths() -> None:
    """The defaults are always personal; configured paths add to them, once, sorted."""
    fields = PersonalFields.parse(["node.metadata.contact", " run.trigger.metadata.email",
                                   "node.metadata.contact", "run.customer"])
    assert fields.to_json() == {
        "node": ["error", "input", "metadata.contact", "output"],
        "run": ["customer", "error", "trigger.metadata.email"]}
    assert PersonalFields.parse([]) == personal.DEFAULTS


@pytest.mark.parametrize("item", [
    "metadata.contact", "nodes.x", "node.", "node.a..b", "node.a.b c", "node.a.$where",
    "node.a.0", "node." + ".".join(["k"] * 17), "node." + "k" * 65, "node.runId",
    "node.status.x", "node.model", "run.trigger", "run.trigger.source", "run.trigger.type.x",
    "run.subjects", "run.erasure.by", "run.nodeIndex.a", "run.eventIds",
])
def test_bad_or_protected_paths_are_refused(item: str) -> None:
    """Paths without node./run., with bad keys, too deep, or naming identity and merge
    fields are refused at the edge (settings), with the variable named."""
    with pytest.raises(ConfigError):
        PersonalFields.parse([item])
    with pytest.raises(ConfigError):
        Settings(personal_fields=(item,), metrics_port=0)


def test_settings_read_the_paths_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """AUDIT_PERSONAL_FIELDS is a comma list."""
    monkeypatch.setenv("AUDIT_PERSONAL_FIELDS", "node.metadata.contact, run.customer.name")
    settings = Settings.from_env(metrics_port=0)
    assert settings.personal().names("run") == ["customer.name", "error"]


def test_without_removes_paths_and_never_changes_the_input() -> None:
    """Nested keys are removed, top-level run fields nulled with null_top; paths through
    lists or missing keys change nothing; the original is left as it was."""
    doc: dict[str, Any] = {"a": {"b": {"c": 1, "d": 2}, "l": [{"c": 1}]}, "top": "x",
                           "keep": True}
    out = personal.without(doc, [("a", "b", "c"), ("a", "l", "c"), ("nope", "x"), ("top",)])
    assert out == {"a": {"b": {"d": 2}, "l": [{"c": 1}]}, "keep": True}
    assert doc["a"]["b"] == {"c": 1, "d": 2}
    assert "top" in doc
    nulled = personal.without(doc, [("top",), ("a", "b")], null_top=True)
    assert nulled == {"a": {"l": [{"c": 1}]}, "top": None, "keep": True}
    assert personal.holds(doc, [("a", "b", "d")])
    assert not personal.holds(doc, [("a", "l", "c"), ("missing",)])
    assert personal.with_value({"a": 1}, ("b", "c"), 2) == {"a": 1, "b": {"c": 2}}


def test_nested_paths_seal_and_open_in_place() -> None:
    """A configured nested path is sealed where it is (a sealed parent covers it), opens
    back to the value, and reads as erased once its key is shredded."""
    fields = PersonalFields.parse(["node.metadata.contact", "node.input.customer"])
    doc = {"runId": "r1", "nodeKey": "n#1", "input": {"customer": "c", "p": "x"},
           "metadata": {"contact": "ann@example.com", "channel": "mail"}}
    master = MasterKey(bytes(32))
    row, key = master.new_key("ws", "r1")
    sealed = seal("ws", "node", doc, row.key_id, key, fields)
    assert sealed["metadata"]["channel"] == "mail"
    assert sealed["metadata"]["contact"]["$enc"] == "aes-256-gcm"
    assert sealed["input"]["$enc"] == "aes-256-gcm"  # the whole input, not twice
    assert sealed_kids("node", sealed) == {row.key_id}
    assert holds_personal("node", doc, fields)
    assert not holds_personal("node", sealed, fields)
    assert Opener("ws", master, [row]).open("node", sealed) == doc
    shredded = Opener("ws", master, [type(row)(row.run_id, row.key_id, None, row.created_at,
                                              row.created_at)])
    opened = shredded.open("node", sealed)
    assert opened["metadata"]["contact"]["erased"] is True
    assert opened["metadata"]["channel"] == "mail"

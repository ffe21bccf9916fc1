"""The event contract as a JSON Schema, generated from the Structs the worker validates with.

``docs/event.schema.json`` is this schema, committed (a test fails when it drifts from the
structs). Regenerate it with ``python -m worker.schema > docs/event.schema.json``.

The schema describes the shape (fields, types, enumerations, lengths); a few rules live
in code and are not expressible in it (times within range in UTC, identifier character
classes beyond the pattern, nesting depth): ``audit-fleet validate`` applies every rule,
exactly as the worker does.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import msgspec

from . import constants as c
from .events import Event


def event_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one v1 event."""
    schema: dict[str, Any] = msgspec.json.schema(Event)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"Audit Fleet event, contract version {c.SCHEMA_VERSION}",
        "description": "One JSON object per stream entry (field "
        f"'{c.EVENT_FIELD}'); see docs/events.md. Generated from worker/events.py.",
        **schema,
    }


def schema_text() -> str:
    """The schema as committed: sorted keys, two-space indents, a final newline."""
    return json.dumps(event_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(schema_text())

"""Event data as text for pages: never markup (autoescape does that), never control codes."""

from __future__ import annotations

import json
import re
from typing import Any, Final

#: C0 and C1 control characters (but tab and newline), DEL, and the bidirectional
#: overrides and isolates that can reorder what a reader sees.
_CONTROL: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean(value: Any) -> str:
    """``value`` as display text: objects as indented JSON, control characters shown as
    ``\\x1b``-style escapes instead of being passed to the reader's terminal or browser."""
    if value is None:
        return ""
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict | list):
        text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)
    else:
        text = str(value)
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", text)

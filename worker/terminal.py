"""Archived text shown on a terminal, safely.

A turn's text is whatever an agent (or its user) wrote, and `history` and `search` print it. An
escape sequence in it could clear the screen or retitle the window, and a line break followed by
"#12 ... assistant:" could pass for an entry of its own. So control characters are shown as
escapes, and a turn's own line breaks are indented under it. `--json` output needs none of this:
JSON escapes them itself.
"""

from __future__ import annotations

import re

# C0 controls but tab and line feed, DEL, C1 controls, and the bidirectional overrides that
# can make text read differently from what it holds.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
INDENT = "    "


def printable(text: str) -> str:
    shown = _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return shown.replace("\n", "\n" + INDENT)

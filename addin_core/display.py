"""Text from manifests and the network made safe for a terminal.

A manifest's DisplayName, Description or a finding's reason can hold control characters (C0,
C1 such as U+009B, which some terminals read as CSI) and format characters (bidi overrides such
as U+202E, isolates U+2066-U+2069, marks U+200E/U+200F, zero-width joiners). Printed raw they
move the cursor, change colours, or make "evil.exe" read as something else. Every place the
CLIs print such text passes it through `printable`, which shows each one as a visible escape.
"""

from __future__ import annotations

import unicodedata

# Categories shown as escapes: Cc (controls), Cf (format: bidi, zero-width), Cs (lone
# surrogates), Co/Cn (private use, unassigned), Zl/Zp (line and paragraph separators).
_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _escape(ch: str) -> str:
    # The same spelling as JSON's escapes, so text and --json output read alike.
    code = ord(ch)
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """`text` with every control or format character replaced by a visible escape such as
    ``\\u202e``. With `keep_newlines`, "\\n" stays (for a multi-line block rendered by us)."""
    if text.isascii() and text.isprintable():
        return text
    out: list[str] = []
    for ch in text:
        if keep_newlines and ch == "\n":
            out.append(ch)
        elif unicodedata.category(ch) in _UNSAFE:
            out.append(_escape(ch))
        else:
            out.append(ch)
    return "".join(out)

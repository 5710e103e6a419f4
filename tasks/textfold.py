"""The form of a text that rules match against, so that spelling tricks do not slip past them.

`fold` maps compatibility forms to their plain letters (NFKC: full-width `Ｉｇｎｏｒｅ`,
ligatures, superscripts), removes invisible format characters (zero-width spaces and joiners,
soft hyphens, direction marks), maps Cyrillic and Greek letters that look like Latin ones to
those, and collapses each run of whitespace within a line (no-break spaces included) to one
space; line breaks stay unless asked otherwise, for rules that read lines. The folded text
is for matching only: what a request or a chunk says is passed on unchanged.
"""

from __future__ import annotations

import re
import unicodedata

# Cyrillic and Greek letters drawn like Latin ones, lower and upper case.
_LOOKALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d",
    "ӏ": "l", "ԛ": "q", "ԝ": "w", "ɡ": "g",
    "А": "A", "В": "B", "Е": "E", "Ё": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P",
    "С": "C", "Т": "T", "У": "Y", "Х": "X", "І": "I", "Ї": "I", "Ј": "J", "Ѕ": "S", "Ԁ": "D",
    "Ӏ": "I",
    "α": "a", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u",
    "χ": "x", "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M",
    "Ν": "N", "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
})
_SPACES = re.compile(r"[^\S\n]+")
_ALL_SPACES = re.compile(r"\s+")


def fold(text: str, *, lines: bool = True) -> str:
    """`text` as rules see it (see the module's docstring); with `lines=False`, line breaks
    are spaces too, for rules that read a text as one line."""
    spaces = _SPACES if lines else _ALL_SPACES
    if text.isascii():
        return spaces.sub(" ", text)
    plain = unicodedata.normalize("NFKC", text)
    visible = "".join(c for c in plain if unicodedata.category(c) != "Cf")
    return spaces.sub(" ", visible.translate(_LOOKALIKES))

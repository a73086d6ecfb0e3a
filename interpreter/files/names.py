"""The one file-name sanitiser, shared by upload, mounting into runs and collecting their output.

Names are kept as people wrote them (spaces, parentheses, any script, emoji), because programs and
models refer to files by the name they were given; nothing here ever reaches a shell. What is
removed is what could escape ``/mnt/data`` or confuse a reader: ``..`` and absolute paths,
backslash separators, NUL and control characters, and names too long for the filesystem.
"""

from __future__ import annotations

import hashlib
import unicodedata

NAME_MAX_BYTES = 255  # one path component on Linux
FALLBACK = "file"
_REPLACEMENT = "_"


def _is_control(char: str) -> bool:
    # Cc: C0, DEL and C1 controls; also the line and paragraph separators, which break listings.
    return unicodedata.category(char) == "Cc" or char in "\u2028\u2029"


def _clip(segment: str, limit: int) -> str:
    """Cut ``segment`` to ``limit`` UTF-8 bytes, keeping its extension and telling cut names apart by a hash."""
    if len(segment.encode()) <= limit:
        return segment
    stem, dot, extension = segment.rpartition(".")
    if not dot or not stem or len(extension.encode()) > 16:
        stem, extension = segment, ""
    tag = "-" + hashlib.sha256(segment.encode()).hexdigest()[:6]
    suffix = tag + (f".{extension}" if extension else "")
    room = limit - len(suffix.encode())
    clipped = stem.encode()[:room].decode("utf-8", errors="ignore")  # never split a character
    return clipped + suffix


def sanitize_segment(raw: str, *, max_bytes: int = NAME_MAX_BYTES) -> str:
    """One path component: NFC, control characters replaced, never empty, ``.`` or ``..``, at most ``max_bytes``."""
    text = unicodedata.normalize("NFC", raw)
    text = "".join(_REPLACEMENT if _is_control(char) else char for char in text).strip()
    if text in ("", ".", ".."):
        return ""
    return _clip(text, min(max_bytes, NAME_MAX_BYTES))


def sanitize_path(raw: str, *, max_bytes: int = NAME_MAX_BYTES, nested: bool = True) -> str:
    """A relative path that stays inside the run directory.

    ``/`` and ``\\`` separate components; empty, ``.`` and ``..`` components are dropped (so ``../x``
    and ``/etc/x`` become ``x`` and ``etc/x``). With ``nested=False`` only the last component is kept
    (single uploads). Never returns an empty name.
    """
    parts = [sanitize_segment(part, max_bytes=max_bytes) for part in raw.replace("\\", "/").split("/")]
    parts = [part for part in parts if part]
    if not parts:
        return FALLBACK
    return "/".join(parts if nested else parts[-1:])


def unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``stem (2).ext``, ``stem (3).ext``, ... when it is taken; the result joins ``taken``."""
    if name not in taken:
        taken.add(name)
        return name
    directory, slash, leaf = name.rpartition("/")
    stem, dot, extension = leaf.rpartition(".")
    if not dot or not stem:
        stem, extension = leaf, ""
    number = 2
    while True:
        candidate_leaf = _clip(f"{stem} ({number})" + (f".{extension}" if extension else ""), NAME_MAX_BYTES)
        candidate = f"{directory}{slash}{candidate_leaf}"
        if candidate not in taken:
            taken.add(candidate)
            return candidate
        number += 1

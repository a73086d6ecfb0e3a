"""Checkpoints of the user's variables, made and read inside the jail (the host never unpickles them).

Each variable is pickled on its own with cloudpickle, so one that cannot be (an open file, a
generator, a socket) is named in a warning instead of losing the others. Modules are pickled by
reference and re-imported on restore. Preloaded aliases still bound to their preloaded object are
left out (the kernel binds them again); a variable that merely shares an alias's name is kept.
"""

from __future__ import annotations

import pickle
import zlib
from typing import Any

MAX_WARNING = 200


def _skipped(name: str, value: Any, preloaded: dict[str, Any], lazy_type: type) -> bool:
    if name.startswith("__") and name.endswith("__"):
        return True
    if isinstance(value, lazy_type):
        return True
    return name in preloaded and preloaded[name] is value


def capture(namespace: dict[str, Any], preloaded: dict[str, Any],
            lazy_type: type) -> tuple[bytes, list[str], int]:  # fmt: skip
    """(compressed checkpoint, warnings about what could not be kept, how many variables it holds)."""
    import cloudpickle

    parts: dict[str, bytes] = {}
    warnings: list[str] = []
    for name, value in list(namespace.items()):
        if _skipped(name, value, preloaded, lazy_type):
            continue
        try:
            parts[name] = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - anything unpicklable is reported, not fatal
            warnings.append(f"{name}: not saved ({type(exc).__name__}: {str(exc)[:MAX_WARNING]})")
    return zlib.compress(pickle.dumps(parts, protocol=pickle.HIGHEST_PROTOCOL), 1), warnings, len(parts)


def restore(namespace: dict[str, Any], blob: bytes) -> list[str]:
    """Bind the checkpoint's variables into ``namespace``; returns warnings about those that failed."""
    import cloudpickle

    try:
        parts = pickle.loads(zlib.decompress(blob))
    except Exception as exc:  # noqa: BLE001
        return [f"the saved state could not be read ({type(exc).__name__})"]
    warnings = []
    for name, raw in parts.items():
        try:
            namespace[name] = cloudpickle.loads(raw)
        except Exception as exc:  # noqa: BLE001 - e.g. a module that is no longer installed
            warnings.append(f"{name}: not restored ({type(exc).__name__}: {str(exc)[:MAX_WARNING]})")
    return warnings

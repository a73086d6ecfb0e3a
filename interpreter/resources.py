"""Where bundled data lives: the checkout/site-packages, or PyInstaller's extraction dir."""

from __future__ import annotations

import sys
from pathlib import Path


def bundle_root() -> Path:
    """The directory holding the ``interpreter`` and ``sandboxes`` data trees."""
    meipass = getattr(sys, "_MEIPASS", None)
    if meipass is not None:
        return Path(meipass)
    return Path(__file__).resolve().parent.parent


def sandboxes_dir() -> Path:
    return bundle_root() / "sandboxes"


def static_dir() -> Path:
    return bundle_root() / "interpreter" / "api" / "static"

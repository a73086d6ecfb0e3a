# Runtime hook (runs before interpreter/__main__.py in the one-file binary): child processes get the host's
# library search path, not the bundle's.
#
# The bootloader points LD_LIBRARY_PATH at the extraction directory and keeps the original value in
# LD_LIBRARY_PATH_ORIG. This process's dynamic loader read it at start, so changing it here only affects
# children: nsjail (which finds its own libraries through its RPATH), the programs it runs, and doctor's probes
# of the sandbox venv, which must load the host's libssl, libstdc++, ... and not the copies in the bundle.
import os

_original = os.environ.pop("LD_LIBRARY_PATH_ORIG", None)
if _original is not None:
    os.environ["LD_LIBRARY_PATH"] = _original
else:
    os.environ.pop("LD_LIBRARY_PATH", None)
del _original

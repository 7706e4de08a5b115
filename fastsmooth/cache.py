"""Where fastsmooth keeps files between runs: $FASTSMOOTH_CACHE, else the user's cache folder.

Used by the embedded default model (embedded.py), the engine's timed calibrations and the
torch.compile cache (tuning.py). platformdirs names the folder (~/.cache/fastsmooth on Linux); where it
is not installed (a GPU image with its own packages), $XDG_CACHE_HOME/fastsmooth or ~/.cache/fastsmooth.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FASTSMOOTH_CACHE"


def cache_dir() -> Path:
    """$FASTSMOOTH_CACHE, else the user's cache folder for fastsmooth (platformdirs)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    try:
        import platformdirs
    except ImportError:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "fastsmooth"
    return Path(platformdirs.user_cache_dir("fastsmooth"))

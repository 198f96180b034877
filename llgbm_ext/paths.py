"""Where llgbm_ext keeps files it creates itself (the embedded model, caches)."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of llgbm_ext's cache: ``$LLGBM_CACHE``, else ``$XDG_CACHE_HOME/llgbm_ext``, else ``~/.cache/llgbm_ext``."""
    if os.environ.get("LLGBM_CACHE"):
        return Path(os.environ["LLGBM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "llgbm_ext"

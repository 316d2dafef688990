"""Where fedsim keeps files between runs (the tokenized-data and layer-shape caches)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where fedsim caches tokenized data and model shapes: ``$FEDSIM_CACHE_DIR`` or ``~/.cache/fedsim``."""
    return Path(os.environ.get("FEDSIM_CACHE_DIR", Path.home() / ".cache" / "fedsim"))

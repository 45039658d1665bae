"""Environment switches of optimisations that are on by default."""

from __future__ import annotations

import os


def on_by_default(name: str) -> bool:
    """False when the environment variable `name` is '0' or 'false' (any case), else True. Read
    at each call, so a change applies to what is built (or captured) after it."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false")

"""Environment switches: optimisations on by default, and variants kept off by default."""

from __future__ import annotations

import os


def on_by_default(name: str) -> bool:
    """False when the environment variable `name` is '0' or 'false' (any case), else True. Read
    at each call, so a change applies to what is built (or captured) after it."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false")


def off_by_default(name: str) -> bool:
    """True when the environment variable `name` is set to anything but '', '0' or 'false' (any
    case), else False. Read at each call, like `on_by_default`."""
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false")

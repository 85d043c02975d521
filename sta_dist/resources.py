"""The files shipped in ``sta_dist.configs`` (the repository's ``configs/``)."""

from __future__ import annotations

import importlib.resources


def packaged(name: str) -> str:
    """Path of a file shipped in ``sta_dist.configs``."""
    return str(importlib.resources.files("sta_dist.configs") / name)

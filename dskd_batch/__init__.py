"""dskd-batch: two-stage Dual-Space Knowledge Distillation for LLMs.

Stage one caches what distillation needs from a teacher (``dskd-batch cache-teacher``); stage two
trains students from that cache without loading the teacher (``dskd-batch distill``).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["open_cache", "DskdError", "__version__"]

from .errors import DskdError


def open_cache(path: Any, verify: str = "lazy") -> Any:
    """Open a teacher cache as a sequence of example records (see :mod:`dskd_batch.cache.reader`)."""
    from .cache.reader import open_cache as _open

    return _open(path, verify=verify)

"""dskd-batch: two-stage Dual-Space Knowledge Distillation for LLMs.

Stage one caches what distillation needs from a teacher (``dskd-batch cache-teacher``); stage two
trains students from that cache without loading the teacher (``dskd-batch distill``). The three
stages are functions of their configs: ``cache_teacher(CacheConfig)``, ``distill(DistillConfig)`` and
``evaluate(EvalConfig)``, importable from here (they live in :mod:`dskd_batch.teacher.caching`,
:mod:`dskd_batch.train.distill` and :mod:`dskd_batch.eval.evaluate`).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["open_cache", "cache_teacher", "distill", "evaluate", "DskdError", "__version__"]

from .errors import DskdError


def open_cache(path: Any, verify: str = "lazy") -> Any:
    """Open a teacher cache as a sequence of example records (see :mod:`dskd_batch.cache.reader`)."""
    from .cache.reader import open_cache as _open

    return _open(path, verify=verify)


_STAGES = {"cache_teacher": "teacher.caching", "distill": "train.distill", "evaluate": "eval.evaluate"}


def __getattr__(name: str) -> Any:
    """The stage functions, imported when first asked for (``import dskd_batch`` stays light)."""
    if name in _STAGES:
        from importlib import import_module

        return import_module(f".{_STAGES[name]}", __name__).run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

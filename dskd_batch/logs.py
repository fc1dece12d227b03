"""Logging set-up shared by the command line and the pipeline's worker processes."""

from __future__ import annotations

import logging

NOISY = ("transformers", "urllib3", "httpx", "datasets", "numcodecs", "zarr")


def configure_logging(level: int, tag: str = "") -> None:
    """Log lines as ``HH:MM:SS LEVEL logger: message`` at ``level``; ``tag`` (a pipeline stage run in a
    worker process) goes in brackets after the time. Third-party libraries log warnings only."""
    prefix = f" [{tag}]" if tag else ""
    logging.basicConfig(level=level, force=True, datefmt="%H:%M:%S",
                        format=f"%(asctime)s{prefix} %(levelname)s %(name)s: %(message)s")
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)

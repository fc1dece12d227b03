"""One writer per folder: an OS file lock (``fcntl.flock``) on ``FOLDER/.lock-NAME``.

The kernel releases the lock when its process ends, however it ends, so a killed run never leaves
a stale lock behind: the next run (a resume) takes it at once. A second process that wants a lock
already held stops with one error naming the holder (pid, host, command, start time) instead of
writing beside it. Writers that may share a folder (machines with their own ``--shard-index``,
torchrun ranks) take locks of different names.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DskdError

LOCK_PREFIX = ".lock"


def is_lock_file(p: Path) -> bool:
    return p.name.startswith(LOCK_PREFIX)


@contextmanager
def folder_lock(folder: Path, name: str, what: str) -> Iterator[Path]:
    """Hold ``folder/.lock-NAME`` for the duration of the block (``what`` names the folder's role in
    the error, e.g. "cache" or "run folder"). A folder this call created and that still holds
    nothing but lock files at the end (the command was refused before it wrote anything) is
    removed again."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{LOCK_PREFIX}-{name}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
        finally:
            os.close(fd)
        raise DskdError(f"{what} {folder} is being written by another process: {holder}",
                        hint="wait for it to finish (or stop it); a stopped or killed process releases the lock, "
                             "and running the same command again then resumes") from None
    try:
        os.ftruncate(fd, 0)
        cmd = " ".join(sys.argv[:6])
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
                      f"({cmd})\n".encode(), 0)
        yield path
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        if created and folder.is_dir() and all(is_lock_file(p) for p in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)

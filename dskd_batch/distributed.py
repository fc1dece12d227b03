"""Process-group context for torchrun: rank, world size, barriers, rank-0 logging.

Scale past one process uses PyTorch's own engine: under ``torchrun`` the environment names the
rank and world size; gloo is used on CPU, NCCL on GPUs.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @classmethod
    def from_env(cls, backend: str | None = None) -> "DistContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        here = False
        if not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            # a collective waiting on a process that died ends in an error after this long, not never
            minutes = float(os.environ.get("DSKD_DIST_TIMEOUT_MIN", "10"))
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=minutes))
            here = True
            _stop_cleanly_on_sigterm(rank, world)
        return cls(rank, world, local, here)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def _stop_cleanly_on_sigterm(rank: int, world: int) -> None:
    """torchrun stops the other processes of a job with SIGTERM when one fails: say so, and unwind
    (a shard or checkpoint being written is removed, not left half-written), so that the same
    command resumes."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, frame: object) -> None:
        sys.stderr.write(f"error: process {rank} of {world} stopped: another process of this job failed and torchrun "
                         "stopped the rest (SIGTERM); what was finished is kept: run the same command again to "
                         "resume\n")
        sys.stderr.flush()
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, stop)

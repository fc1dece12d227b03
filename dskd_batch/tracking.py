"""Where a run's metrics go: ``metrics.jsonl`` always (the source of truth), and optionally an
experiment tracker.

``TRACKERS`` (name -> class) is the one registry: a new tracker is one class here with
``__init__(run_dir, name, config)``, ``log(record)`` and ``close()``. ``--log-to`` accepts its
name. Trackers are optional extras (``pip install dskd-batch[tensorboard]`` / ``[wandb]``); a
missing package is reported before training starts.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, TextIO

from .errors import DskdError


def _numbers(rec: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of a record (step and booleans aside), as floats."""
    return {k: float(v) for k, v in rec.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def _group(name: str) -> str:
    """TensorBoard / W&B section of a metric: validation metrics apart from training ones."""
    return f"eval/{name[5:]}" if name.startswith("eval_") else f"train/{name}"


class TensorBoard:
    """TensorBoard event files in ``RUN/tensorboard`` (``tensorboard --logdir RUN``)."""

    package = "tensorboard"

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def log(self, rec: dict[str, Any]) -> None:
        for k, v in _numbers(rec).items():
            self.writer.add_scalar(_group(k), v, int(rec["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run (``WANDB_MODE=offline`` works without network; the project is
    ``WANDB_PROJECT``, default ``dskd-batch``; files under ``RUN/wandb``)."""

    package = "wandb"

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any]) -> None:
        import wandb

        id_file = run_dir / ".wandb-id"  # a resumed run (--resume) continues the same W&B run
        run_id = os.environ.get("WANDB_RUN_ID") or (id_file.read_text().strip() if id_file.exists() else None)
        if run_id is None:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dskd-batch"), name=name, dir=str(run_dir),
                              config=config, resume="allow", id=run_id)

    def log(self, rec: dict[str, Any]) -> None:
        self.run.log({_group(k): v for k, v in _numbers(rec).items()}, step=int(rec["step"]))

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, type] = {"tensorboard": TensorBoard, "wandb": WandB}
LOG_TO = ("none", *TRACKERS)


def check_tracker(name: str) -> None:
    """Fail before training when the tracker's package is missing."""
    if name == "none":
        return
    import importlib.util

    pkg = TRACKERS[name].package
    if importlib.util.find_spec(pkg) is None:
        raise DskdError(f"--log-to {name} needs the `{pkg}` package, which is not installed",
                        hint=f"pip install {pkg} (or dskd-batch[{name}]), or use --log-to none")


class MetricsLog:
    """Append records to ``metrics.jsonl`` (flushed per line) and mirror them to a tracker."""

    def __init__(self, path: Path, log_to: str = "none", name: str = "", config: dict[str, Any] | None = None
                 ) -> None:
        self.file: TextIO = path.open("a")
        self.tracker = TRACKERS[log_to](path.parent, name or path.parent.name, config or {}) \
            if log_to != "none" else None

    def write(self, rec: dict[str, Any]) -> None:
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tracker is not None:
            self.tracker.log(rec)

    def close(self) -> None:
        self.file.close()
        if self.tracker is not None:
            self.tracker.close()

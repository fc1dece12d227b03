"""Held-out evaluation during training (`distill --eval-data DEV`) and the best-checkpoint rule
(`--keep-best METRIC`).

DEV is a corpus (any row shape the loader reads, encoded with the run's template and limits) or a
teacher cache of held-out data made with the same teacher, tokenizer, template and limits. Every
``--eval-steps`` optimizer steps (and at the end of each epoch and of training) the student reads
each DEV example under teacher forcing, in evaluation mode, and we log per response token:

- ``eval_ce``: cross-entropy of the reference response tokens (nats per token);
- from a cache only: ``eval_kl``, KL(p_T || q_S) at T = 1 from the teacher's full distribution
  (the same rule that training reads), and ``eval_top1``, the share of positions where the
  student's argmax is the teacher's.

Sums are taken over this process's share of DEV and all-reduced, so the figures do not depend
on the number of processes or the batch size.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..files import atomic_write_json, read_json, replace_dir, tmp_path
from ..errors import DskdError

log = logging.getLogger(__name__)

# metric -> True when larger is better
EVAL_METRICS = {"eval_ce": False, "eval_kl": False, "eval_top1": True}
BEST_DIR = "best"
BEST_INFO = "best.json"


@dataclass(kw_only=True)
class Validation:
    """The DEV examples (any example source with ``records``), whether they carry the teacher's
    record, and how often to evaluate."""

    examples: Any
    with_teacher: bool
    batch_size: int
    every: int  # optimizer steps between evaluations (0: at each epoch end only)
    keep_best: str | None = None
    source: str = ""
    head: Any = None  # the DEV cache's TeacherHead, on the training device (None for a corpus)

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("eval_ce", "eval_kl", "eval_top1") if self.with_teacher else ("eval_ce",)

    def due(self, step: int, end_of_epoch: bool, last: bool) -> bool:
        return last or end_of_epoch or (self.every > 0 and step % self.every == 0)

    @torch.no_grad()
    def run(self, model: torch.nn.Module, *, pad_id: int, device: torch.device, rank: int,
            world: int) -> dict[str, float]:
        """Evaluate ``model`` (the wrapped DistillModule) on DEV; returns the eval_* metrics."""
        n = len(self.examples)
        lengths = self.examples.n_tokens
        order = sorted(range(n), key=lambda i: (-lengths[i], i))[rank::world]
        # every process runs as many forwards (a sharded model gathers its weights in each): one
        # with fewer examples repeats its first batch and drops the result
        batches = math.ceil(math.ceil(n / world) / self.batch_size)
        sums = torch.zeros(4, dtype=torch.float64)  # ce, kl, top1, tokens
        was_training = model.training
        model.eval()
        try:
            for b in range(batches):
                idxs = order[b * self.batch_size:(b + 1) * self.batch_size]
                mb = self.examples.collate(self.examples.records(idxs or [0]), pad_id, self.with_teacher).to(device)
                out = model(mb, self.head, evaluate=True)
                if idxs:
                    sums += torch.stack([out["ce"], out.get("kl", out["ce"] * 0), out.get("top1", out["ce"] * 0),
                                         out["tokens"]]).double().cpu()
        finally:
            model.train(was_training)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(sums)
        tokens = max(float(sums[3]), 1.0)
        res = {"eval_ce": float(sums[0]) / tokens}
        if self.with_teacher:
            res.update(eval_kl=float(sums[1]) / tokens, eval_top1=float(sums[2]) / tokens)
        res["eval_tokens"] = int(sums[3])
        return res


def better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new > old if EVAL_METRICS[metric] else new < old


class BestKeeper:
    """``RUN/best/``: the student (or LoRA adapter) with the best ``metric`` so far, and
    ``best.json`` (step, metric, value). Written by renaming a finished folder, so a kill never
    leaves a half-written best. On resume a best newer than the checkpoint is dropped (the
    resumed run recomputes those steps exactly)."""

    def __init__(self, run_dir: Path, metric: str) -> None:
        self.dir = run_dir / BEST_DIR
        self.metric = metric
        self.info: dict[str, Any] | None = None

    def load(self, resumed_step: int) -> None:
        import shutil

        info_path = self.dir / BEST_INFO
        if not info_path.exists():
            self.info = None
            return
        try:
            info = read_json(info_path)
        except (OSError, json.JSONDecodeError) as e:
            raise DskdError(f"{info_path} is unreadable ({e})", hint=f"delete {self.dir} and resume") from e
        if info.get("metric") != self.metric or int(info["step"]) > resumed_step:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.info = None
        else:
            self.info = info

    def offer(self, step: int, metrics: dict[str, float], writer: Any, is_main: bool = True) -> bool:
        """Keep the student if ``metrics[metric]`` beats the best so far. Every process calls this
        (the metrics are all-reduced, so all decide alike); ``writer()`` returns the function that
        writes the student (gathering sharded weights is a collective), the main process calls it."""
        value = metrics[self.metric]
        if not better(self.metric, value, None if self.info is None else float(self.info["value"])):
            return False
        write = writer()
        info = {"step": step, "metric": self.metric, "value": value, "metrics": metrics}
        self.info = info
        if not is_main:
            return True
        tmp = tmp_path(self.dir)
        tmp.mkdir(parents=True)
        write(tmp / "student", None)
        atomic_write_json(tmp / BEST_INFO, info)
        replace_dir(tmp, self.dir)
        log.info("best %s so far: %.4f at step %d (kept in %s)", self.metric, value, step, self.dir)
        return True

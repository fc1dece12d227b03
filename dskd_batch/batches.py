"""Training examples and batches for stage two: where examples come from, their order, and how a
global batch becomes micro-batches of tensors.

Sources of examples (all yield the same record dicts as the cache reader):

- :class:`CacheExamples`: a teacher cache (records carry the teacher's outputs).
- :class:`CorpusExamples`: a corpus encoded with the student's tokenizer (no teacher outputs).
- :class:`LiveTeacher` fills the teacher fields of records by running the teacher with
  :class:`~dskd_batch.teacher.TeacherForward`, the function stage one uses.

Order: one permutation per epoch from ``(seed, epoch)``; with a cache the shards are shuffled and
then the examples inside each shard, so each shard's chunks are decompressed once per epoch. The
order is a pure function of the seed and the epoch, so resuming needs no sampler state. A global
batch (``batch_size x grad_accum x world_size`` examples; the last incomplete one is dropped) is
sorted by length and dealt into micro-batches; every process knows the whole global batch, so
the number of response tokens of an optimizer step is known without communication.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .cache.reader import TeacherCache
from .data import Encoded, target_positions
from .methods import CrossBatch, TeacherBatch
from .records import TEACHER_FIELDS, rows_at, training_positions
from .teacher import TeacherForward

Record = dict[str, Any]


class CacheExamples:
    """Example sources expose, per example, ``n_tokens``, ``prompt_len`` and ``n_targets`` (the
    positions trained on: known before any record is read, so a step's token count needs no
    communication) and ``records(idxs)``."""

    has_teacher = True

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache
        self.n_tokens, self.prompt_len = cache.example_lengths()
        self.n_targets = (cache.index_column("n_positions") if cache.stored_positions == "targets" else
                          [len(target_positions(n, p)) for n, p in zip(self.n_tokens, self.prompt_len)])
        self.groups: list[range] | None = cache.shard_ranges()

    def __len__(self) -> int:
        return len(self.n_tokens)

    def records(self, idxs: list[int]) -> list[Record]:
        return [self.cache[i] for i in idxs]


class AlignedExamples(CacheExamples):
    """A cache seen by a student with another tokenizer: the student's token ids and the alignment
    come from the cache's alignment sidecar, the teacher's record from the cache."""

    def __init__(self, cache: TeacherCache, alignment: Any) -> None:
        self.cache = cache
        self.groups = cache.shard_ranges()
        self.alignment = alignment
        self.n_tokens = alignment.student_lengths()
        self.prompt_len = alignment.student_prompt_len.tolist()
        explicit = alignment.target_counts()  # a conversation's student targets (0: the prompt/response rule)
        self.n_targets = [e or len(target_positions(n, p)) for e, n, p in zip(explicit, self.n_tokens, self.prompt_len)]

    def records(self, idxs: list[int]) -> list[Record]:
        out = []
        for i in idxs:
            rec = self.cache[i]
            row = self.alignment.row(i)
            rec["teacher_input_ids"] = rec.pop("input_ids")
            rec["teacher_prompt_len"] = rec.pop("prompt_len")
            rec["teacher_targets"] = rec.pop("targets", None)
            rec["input_ids"] = torch.from_numpy(row.pop("student_ids").astype("int64"))
            targets = row.pop("student_targets")
            if len(targets):
                rec["targets"] = torch.from_numpy(targets.astype("int64"))
            rec["prompt_len"] = int(self.alignment.student_prompt_len[i])
            rec.update({k: torch.from_numpy(v.astype("int64")) for k, v in row.items()})
            out.append(rec)
        return out


class CorpusExamples:
    has_teacher = False

    def __init__(self, encoded: list[Encoded]) -> None:
        self.encoded = encoded
        self.n_tokens = [len(e.input_ids) for e in encoded]
        self.prompt_len = [e.prompt_len for e in encoded]
        self.n_targets = [len(e.targets()) for e in encoded]
        self.groups = None

    def __len__(self) -> int:
        return len(self.encoded)

    def records(self, idxs: list[int]) -> list[Record]:
        return [{"input_ids": torch.tensor(self.encoded[i].input_ids, dtype=torch.long),
                 "prompt_len": self.encoded[i].prompt_len, "targets": self.encoded[i].explicit_targets}
                for i in idxs]


class LiveTeacher:
    """Runs the teacher on the records' token ids and adds its outputs to each record."""

    def __init__(self, tf: TeacherForward, keep_logits: bool) -> None:
        self.tf = tf
        self.keep_logits = keep_logits
        self.calls = 0
        self.seconds = 0.0

    def run(self, sequences: list[list[int]], positions: list[list[int]]) -> list[Record]:
        """The teacher's records at ``positions`` of token-id sequences (timed and counted)."""
        import time

        t0 = time.perf_counter()
        out = self.tf(sequences, positions=positions, keep_logits=self.keep_logits)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def fill(self, recs: list[Record]) -> list[Record]:
        """Add the teacher's outputs at each record's training positions."""
        outs = self.run([r["input_ids"].tolist() for r in recs], [training_positions(r).tolist() for r in recs])
        for r, t in zip(recs, outs):
            r.update(t)
        return recs


def epoch_order(n: int, groups: list[range] | None, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if not groups:
        return torch.randperm(n, generator=g).tolist()
    order: list[int] = []
    for k in torch.randperm(len(groups), generator=g).tolist():
        rng = groups[k]
        order += [rng[j] for j in torch.randperm(len(rng), generator=g).tolist()]
    return order


def global_batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order) - size + 1, size)]


def micro_batches(batch: list[int], lengths: list[int], batch_size: int, world: int, rank: int) -> list[list[int]]:
    """This process's micro-batches of a global batch: sorted by length, dealt round-robin."""
    ordered = sorted(batch, key=lambda i: (-lengths[i], i))
    chunks = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    return chunks[rank::world]


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    select: torch.Tensor  # [B, L] bool: response positions
    targets: torch.Tensor  # [N]
    teacher: TeacherBatch | None
    tokens: int  # real (unpadded) tokens
    cross: CrossBatch | None = None
    on_policy: "MicroBatch | None" = None  # the student's samples for these prompts, scored by the live teacher
    kd_scale: float = 1.0  # on-policy steps: ground-truth response tokens / sampled response tokens of the step

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(self.input_ids.to(device), self.attention_mask.to(device), self.select.to(device),
                          self.targets.to(device), self.teacher.to(device) if self.teacher is not None else None,
                          self.tokens, self.cross.to(device) if self.cross is not None else None,
                          self.on_policy.to(device) if self.on_policy is not None else None, self.kd_scale)


def collate(recs: list[Record], pad_id: int, with_teacher: bool) -> MicroBatch:
    cross = with_teacher and "teacher_input_ids" in recs[0]  # records aligned to another tokenizer
    width = max(len(r["input_ids"]) for r in recs)
    ids = torch.full((len(recs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(recs), width), dtype=torch.long)
    select = torch.zeros((len(recs), width), dtype=torch.bool)
    targets, parts = [], {k: [] for k in TEACHER_FIELDS}
    for b, r in enumerate(recs):
        x = r["input_ids"]
        n, pos = len(x), training_positions(r)
        ids[b, :n] = x
        mask[b, :n] = 1
        select[b, pos] = True
        targets.append(x[pos + 1])
        if with_teacher and not cross:
            _teacher_rows(r, pos, parts)
    tb, cb = None, None
    if cross:
        tb, cb = _cross_part(recs)
    elif with_teacher:
        tb = TeacherBatch(**{k: (torch.cat(v) if v else None) for k, v in parts.items()})
    return MicroBatch(ids, mask, select, torch.cat(targets), tb, int(mask.sum()), cb)


def _teacher_rows(rec: Record, pos: torch.Tensor, parts: dict[str, list]) -> None:
    """Append the record's teacher rows at the positions ``pos`` to ``parts``."""
    at = rows_at(rec, pos)
    for k in TEACHER_FIELDS:
        if rec.get(k) is not None:
            parts[k].append(rec[k][at])


def _cross_part(recs: list[Record]) -> tuple[TeacherBatch, CrossBatch]:
    """The teacher's response positions of records aligned to another tokenizer, and the alignment
    as flat indices into the micro-batch's student (N) and teacher (M) positions."""
    parts: dict[str, list] = {k: [] for k in TEACHER_FIELDS}
    c: dict[str, list] = {k: [] for k in CrossBatch.__dataclass_fields__}
    off_s = off_t = 0
    for b, r in enumerate(recs):
        x, t = r["input_ids"], r["teacher_input_ids"]
        pos_s = training_positions(r)
        pos_t = training_positions({"input_ids": t, "prompt_len": r["teacher_prompt_len"],
                                    "targets": r.get("teacher_targets")})
        n_s, n_t = len(pos_s), len(pos_t)
        _teacher_rows(r, pos_t, parts)
        c["eta_s"].append(r["eta_s"] + off_s)
        c["eta_t"].append(r["eta_t"] + off_t)
        c["eta_label"].append(r["eta_label"])
        c["mined_t"].append(torch.where(r["mined_t"] >= 0, r["mined_t"] + off_t, r["mined_t"]))
        k = torch.arange(min(n_s, n_t))
        c["uld_s"].append(k + off_s)
        c["uld_t"].append(k + off_t)
        c["seg_s"].append(torch.full((n_s,), b))
        c["seg_t"].append(torch.full((n_t,), b))
        c["s_inputs"].append(x[pos_s])
        c["t_inputs"].append(t[pos_t])
        c["t_targets"].append(t[pos_t + 1])
        off_s += n_s
        off_t += n_t
    tb = TeacherBatch(**{k: (torch.cat(v) if v else None) for k, v in parts.items()})
    return tb, CrossBatch(**{k: torch.cat(v).long() for k, v in c.items()})


def prefetch(it: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``it`` in a background thread, ``depth`` items ahead (exceptions are re-raised here)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)
        q.put(done)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def step_loader(examples: Any, steps: list[tuple[int, int, list[int]]], *, batch_size: int, world: int, rank: int,
                pad_id: int, live: LiveTeacher | None, with_teacher: bool,
                background: bool, on_policy: Any = None) -> Iterator[tuple[int, int, list[int], list[MicroBatch]]]:
    """(epoch, step-in-epoch, global batch, this process's micro-batches) for each listed step.
    On an on-policy step each micro-batch carries the student's samples scored by the live
    teacher (``on_policy``, an :class:`~dskd_batch.onpolicy.OnPolicy`)."""

    def gen() -> Iterator[tuple[int, int, list[int], list[MicroBatch]]]:
        for epoch, k, batch in steps:
            micro = []
            active = on_policy is not None and on_policy.active(epoch, k)
            for m, idxs in enumerate(micro_batches(batch, examples.n_tokens, batch_size, world, rank)):
                recs = examples.records(idxs)
                if live is not None:
                    recs = live.fill(recs)
                mb = collate(recs, pad_id, with_teacher)
                if active:
                    mb.on_policy = collate(on_policy.records(recs, epoch, k, rank, m), pad_id, True)
                micro.append(mb)
            yield epoch, k, batch, micro

    return prefetch(gen()) if background else gen()



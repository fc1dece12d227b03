"""Training examples and batches for stage two: where examples come from, their order, and how a
global batch becomes micro-batches of tensors.

Sources of examples (all yield the same record dicts as the cache reader):

- :class:`CacheExamples`: a teacher cache (records carry the teacher's outputs);
  :class:`~dskd_batch.train.aligned.AlignedExamples` the same for a student of another tokenizer.
- :class:`CorpusExamples`: a corpus encoded with the student's tokenizer (no teacher outputs).
- :class:`LiveTeacher` fills the teacher fields of records by running the teacher with
  :class:`~dskd_batch.teacher.source.Teacher` stage one uses (a local model or a served one).

Order: one permutation per epoch from ``(seed, epoch)``; with a cache the shards are shuffled and
then the examples inside each shard, so each shard's chunks are decompressed once per epoch. The
order is a pure function of the seed and the epoch, so resuming needs no sampler state. With
``length_group`` N, each run of N global batches of that order is sorted by length and cut into
batches again, shuffled among themselves (:func:`length_grouped`: less padding). A global
batch (``batch_size x grad_accum x world_size`` examples; the last incomplete one is dropped) is
sorted by length and dealt into micro-batches; every process knows the whole global batch, so
the number of response tokens of an optimizer step is known without communication.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..cache.reader import TeacherCache
from ..data import Encoded, encode_example, load_examples, render_prompt, resolve_template, target_positions
from ..cache.records import TEACHER_FIELDS, TeacherBatch, rows_at, training_positions
from ..teacher.source import Teacher

if TYPE_CHECKING:
    from ..methods.cross_vocab import CrossBatch

Record = dict[str, Any]


class Source:
    """The one interface of where training examples and the teacher's outputs come from: a cache,
    a cache aligned for another tokenizer, a corpus (no teacher), a corpus with the live teacher,
    any of them with on-policy sampling on top. The training loop sees only this.

    A source knows, per example, ``n_tokens``, ``prompt_len`` and ``n_targets`` (the positions
    trained on: known before any record is read, so a step's token count needs no
    communication), its shard ``groups`` (or None), whether its records carry the teacher
    (``has_teacher``) and whether it may be read ahead in a background thread (``runs_ahead``:
    not when a model runs inside it). ``records(idxs)`` gives the record dicts of
    :mod:`dskd_batch.cache.records`; ``collate`` turns records into tensors (a source of records aligned
    to another tokenizer adds the alignment) and ``micro_batch`` reads and collates; ``prepare_step`` may adjust
    a step's micro-batches once all of them are known (every process calls it); ``metrics``
    adds the source's own figures to each logged record; ``close`` releases what it holds."""

    has_teacher = True
    runs_ahead = True
    n_tokens: list[int]
    prompt_len: list[int]
    n_targets: list[int]
    groups: list[range] | None = None

    def __len__(self) -> int:
        return len(self.n_tokens)

    def records(self, idxs: list[int]) -> list[Record]:
        raise NotImplementedError

    def micro_batch(self, idxs: list[int], *, pad_id: int, with_teacher: bool, epoch: int, step: int, rank: int,
                    index: int) -> "MicroBatch":
        return self.collate(self.records(idxs), pad_id, with_teacher)

    def collate(self, recs: list[Record], pad_id: int, with_teacher: bool) -> "MicroBatch":
        return collate(recs, pad_id, with_teacher)

    def prepare_step(self, micro: list["MicroBatch"], n_targets: int, ctx: Any) -> None:
        """Called once per optimizer step with this process's micro-batches."""

    def metrics(self, steps_since: int) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


def rule_target_counts(n_tokens: list[int], prompt_len: list[int]) -> list[int]:
    """Per example, the positions trained on under the prompt/response rule (:func:`target_positions`)."""
    return [len(target_positions(n, p)) for n, p in zip(n_tokens, prompt_len)]


class SourceOver(Source):
    """A source that adds something to another one: the examples, their lengths and order are
    the inner source's."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.has_teacher = inner.has_teacher
        self.n_tokens, self.prompt_len, self.n_targets = inner.n_tokens, inner.prompt_len, inner.n_targets
        self.groups = inner.groups

    def records(self, idxs: list[int]) -> list[Record]:
        return self.inner.records(idxs)

    def collate(self, recs: list[Record], pad_id: int, with_teacher: bool) -> "MicroBatch":
        return self.inner.collate(recs, pad_id, with_teacher)

    def metrics(self, steps_since: int) -> dict[str, float]:
        return self.inner.metrics(steps_since)

    def close(self) -> None:
        self.inner.close()


class CacheExamples(Source):
    """A teacher cache: records carry the teacher's outputs."""

    has_teacher = True

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache
        self.n_tokens, self.prompt_len = cache.example_lengths()
        self.n_targets = (cache.index_column("n_positions") if cache.stored_positions == "targets" else
                          rule_target_counts(self.n_tokens, self.prompt_len))
        self.groups: list[range] | None = cache.shard_ranges()

    def records(self, idxs: list[int]) -> list[Record]:
        return [self.cache[i] for i in idxs]


class CorpusExamples(Source):
    """A corpus encoded with the student's tokenizer: no teacher outputs."""

    has_teacher = False

    def __init__(self, encoded: list[Encoded]) -> None:
        self.encoded = encoded
        self.n_tokens = [len(e.input_ids) for e in encoded]
        self.prompt_len = [e.prompt_len for e in encoded]
        self.n_targets = [len(e.targets()) for e in encoded]
        self.groups = None

    def records(self, idxs: list[int]) -> list[Record]:
        return [{"input_ids": torch.tensor(self.encoded[i].input_ids, dtype=torch.long),
                 "prompt_len": self.encoded[i].prompt_len, "targets": self.encoded[i].explicit_targets}
                for i in idxs]


class LiveTeacher:
    """Runs the teacher on the records' token ids and adds its outputs to each record."""

    def __init__(self, tf: Teacher, keep_logits: bool) -> None:
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


class LiveSource(SourceOver):
    """A corpus whose records the live teacher fills as they are read."""

    runs_ahead = False  # the teacher runs in the loop's thread

    def __init__(self, corpus: CorpusExamples, live: LiveTeacher) -> None:
        super().__init__(corpus)
        self.has_teacher = True
        self.live = live

    def records(self, idxs: list[int]) -> list[Record]:
        return self.live.fill(self.inner.records(idxs))

    def metrics(self, steps_since: int) -> dict[str, float]:
        return {"teacher_s": self.live.seconds}

    def close(self) -> None:
        self.live.tf.close()
        super().close()


class OnPolicySource(SourceOver):
    """Another source, and on the steps :meth:`~dskd_batch.train.onpolicy.OnPolicy.active` picks, each
    micro-batch also carries the student's own samples for its prompts, scored by the live teacher
    (``MicroBatch.on_policy``); the KD of such a step is normalised by its sampled tokens."""

    runs_ahead = False  # the student samples in the loop's thread

    def __init__(self, inner: Source, on_policy: Any) -> None:
        super().__init__(inner)
        self.op = on_policy
        self._prev: dict[str, float] = {}

    def micro_batch(self, idxs: list[int], *, pad_id: int, with_teacher: bool, epoch: int, step: int, rank: int,
                    index: int) -> "MicroBatch":
        recs = self.inner.records(idxs)
        mb = self.collate(recs, pad_id, with_teacher)
        if self.op.active(epoch, step):
            mb.on_policy = self.collate(self.op.records(recs, epoch, step, rank, index), pad_id, True)
        return mb

    def prepare_step(self, micro: list["MicroBatch"], n_targets: int, ctx: Any) -> None:
        """Scale the KD of an on-policy step: ground-truth target tokens / sampled tokens (all processes)."""
        import torch.distributed as dist

        ops = [mb.on_policy for mb in micro if mb.on_policy is not None]
        if not ops:  # an off-policy step (every process makes the same choice)
            return
        n_op = torch.tensor(float(sum(int(op.select.sum()) for op in ops)), dtype=torch.float64)
        if ctx.enabled:
            dist.all_reduce(n_op)
        self.op.stats.steps += 1
        for mb in micro:
            mb.kd_scale = n_targets / max(float(n_op), 1.0)

    def metrics(self, steps_since: int) -> dict[str, float]:
        st = self.op.stats
        d = {k: getattr(st, k) - self._prev.get(k, 0) for k in ("steps", "samples", "sample_tokens", "teacher_seconds",
                                                               "sample_seconds")}
        self._prev = {k: getattr(st, k) for k in d}
        return {**self.inner.metrics(steps_since),
                "on_policy_share": d["steps"] / max(steps_since, 1),
                "sample_len": d["sample_tokens"] / d["samples"] if d["samples"] else 0.0,
                "teacher_s_per_batch": d["teacher_seconds"] / d["steps"] if d["steps"] else 0.0,
                "sample_s_per_batch": d["sample_seconds"] / d["steps"] if d["steps"] else 0.0}

    def close(self) -> None:
        self.op.live.tf.close()
        self.inner.close()


def epoch_order(n: int, groups: list[range] | None, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if not groups:
        return torch.randperm(n, generator=g).tolist()
    order: list[int] = []
    for k in torch.randperm(len(groups), generator=g).tolist():
        rng = groups[k]
        order += [rng[j] for j in torch.randperm(len(rng), generator=g).tolist()]
    return order


def length_grouped(order: list[int], lengths: list[int], size: int, group: int, seed: int, epoch: int) -> list[int]:
    """The epoch's order with each run of ``group`` global batches (of ``size`` examples) sorted by
    example length and cut into batches again, those batches then shuffled among themselves: a
    batch holds examples of similar length, so it pads less. The examples of a last incomplete batch
    stay last (they are dropped); ``group`` 1 leaves the order as it is. A pure function of its
    arguments, like the order itself."""
    if group <= 1:
        return order
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 1_000_000_007)
    full = len(order) // size * size
    out: list[int] = []
    for c in range(0, full, size * group):
        run = sorted(order[c:min(c + size * group, full)], key=lambda i: (lengths[i], i))
        batches = [run[i:i + size] for i in range(0, len(run), size)]
        for k in torch.randperm(len(batches), generator=g).tolist():
            out += batches[k]
    return out + order[full:]


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


def collate(recs: list[Record], pad_id: int, with_teacher: bool,
            teacher_part: Callable[[list[Record]], tuple[TeacherBatch, Any]] | None = None) -> MicroBatch:
    """Records as one padded micro-batch. The teacher's rows are taken at the same positions as the
    student's, or, for records aligned to another tokenizer, by ``teacher_part`` (the teacher batch
    at the teacher's own positions and the alignment between the two)."""
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
        if with_teacher and teacher_part is None:
            teacher_rows(r, pos, parts)
    tb, cb = None, None
    if with_teacher and teacher_part is not None:
        tb, cb = teacher_part(recs)
    elif with_teacher:
        tb = TeacherBatch(**{k: (torch.cat(v) if v else None) for k, v in parts.items()})
    return MicroBatch(ids, mask, select, torch.cat(targets), tb, int(mask.sum()), cb)


def teacher_rows(rec: Record, pos: torch.Tensor, parts: dict[str, list]) -> None:
    """Append the record's teacher rows at the positions ``pos`` to ``parts``."""
    at = rows_at(rec, pos)
    for k in TEACHER_FIELDS:
        if rec.get(k) is not None:
            parts[k].append(rec[k][at])


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


def step_loader(source: Source, steps: list[tuple[int, int, list[int]]], *, batch_size: int, world: int, rank: int,
                pad_id: int, with_teacher: bool) -> Iterator[tuple[int, int, list[int], list[MicroBatch]]]:
    """(epoch, step-in-epoch, global batch, this process's micro-batches) for each listed step,
    read ahead in a background thread where the source allows it."""

    def gen() -> Iterator[tuple[int, int, list[int], list[MicroBatch]]]:
        for epoch, k, batch in steps:
            micro = [source.micro_batch(idxs, pad_id=pad_id, with_teacher=with_teacher, epoch=epoch, step=k, rank=rank,
                                        index=m)
                     for m, idxs in enumerate(micro_batches(batch, source.n_tokens, batch_size, world, rank))]
            yield epoch, k, batch, micro

    return prefetch(gen()) if source.runs_ahead else gen()


def calibration_batches(model: Any, tok: Any, data: str | Path, template: str, *, limit: int, max_len: int,
                        batch_size: int, columns: str | None) -> Any:
    """Collated batches of the first ``limit`` rows of ``data`` rendered with ``template`` (whole text)."""
    examples = load_examples(data, limit=limit, columns=columns).examples
    template = resolve_template(template, tok)
    src = CorpusExamples([encode_example(tok, ex, render_prompt(ex, template, tok), max_prompt_len=max_len // 2,
                                         max_len=max_len, template=template) for ex in examples])
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for b in range(0, len(src), batch_size):
        yield collate(src.records(list(range(b, min(b + batch_size, len(src))))), pad, with_teacher=False).to(device)

"""Batches for a student with another tokenizer: the cache's records seen through its alignment
sidecar (:class:`AlignedExamples`), and the alignment of a micro-batch as flat indices
(:func:`cross_part`, called by :func:`dskd_batch.train.batches.collate`)."""

from __future__ import annotations

from typing import Any

import torch

from .batches import CacheExamples, MicroBatch, Record, collate, rule_target_counts, teacher_rows
from ..cache.reader import TeacherCache
from ..cache.records import TEACHER_FIELDS, TeacherBatch, training_positions
from ..methods.cross_vocab import CrossBatch


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
        self.n_targets = [e or r for e, r in zip(explicit, rule_target_counts(self.n_tokens, self.prompt_len))]

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

    def collate(self, recs: list[Record], pad_id: int, with_teacher: bool) -> MicroBatch:
        return collate(recs, pad_id, with_teacher, teacher_part=cross_part)


def chunk_starts(chunk_s: torch.Tensor, chunk_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) positions that begin the same ALM chunk, for the chunks with more than one
    token on a side (a chunk of one token on each side is an ETA pair, a dummy-prefix pair included):
    the first positions of a chunk both predict its first bytes after the same text."""

    def firsts(ids: torch.Tensor) -> tuple[dict[int, int], dict[int, int]]:
        first: dict[int, int] = {}
        count: dict[int, int] = {}
        for j, c in enumerate(ids.tolist()):
            if c >= 0:
                first.setdefault(c, j)
                count[c] = count.get(c, 0) + 1
        return first, count

    (fs, ns), (ft, nt) = firsts(chunk_s), firsts(chunk_t)
    both = [(fs[c], ft[c]) for c in sorted(fs) if c in ft and max(ns[c], nt[c]) > 1]
    return (torch.tensor([a for a, _ in both], dtype=torch.long), torch.tensor([b for _, b in both], dtype=torch.long))


def cross_part(recs: list[Record]) -> tuple[TeacherBatch, CrossBatch]:
    """The teacher's response positions of records aligned to another tokenizer, and the alignment
    as flat indices into the micro-batch's student (N) and teacher (M) positions."""
    parts: dict[str, list] = {k: [] for k in TEACHER_FIELDS}
    c: dict[str, list] = {k: [] for k in CrossBatch.__dataclass_fields__}
    off_s = off_t = off_c = 0
    for b, r in enumerate(recs):
        x, t = r["input_ids"], r["teacher_input_ids"]
        pos_s = training_positions(r)
        pos_t = training_positions({"input_ids": t, "prompt_len": r["teacher_prompt_len"],
                                    "targets": r.get("teacher_targets")})
        n_s, n_t = len(pos_s), len(pos_t)
        teacher_rows(r, pos_t, parts)
        c["eta_s"].append(r["eta_s"] + off_s)
        c["eta_t"].append(r["eta_t"] + off_t)
        c["eta_label"].append(r["eta_label"])
        c["eta_shift"].append(r.get("eta_shift", torch.zeros_like(r["eta_s"])))
        c["mined_t"].append(torch.where(r["mined_t"] >= 0, r["mined_t"] + off_t, r["mined_t"]))
        k = torch.arange(min(n_s, n_t))
        c["uld_s"].append(k + off_s)
        c["uld_t"].append(k + off_t)
        c["seg_s"].append(torch.full((n_s,), b))
        c["seg_t"].append(torch.full((n_t,), b))
        c["s_inputs"].append(x[pos_s])
        c["t_inputs"].append(t[pos_t])
        c["t_targets"].append(t[pos_t + 1])
        chunks = {side: r.get(side, torch.full((n,), -1, dtype=torch.long)) for side, n in (("chunk_s", n_s),
                                                                                          ("chunk_t", n_t))}
        for side, ids in chunks.items():  # chunk ids made unique in the micro-batch
            c[side].append(torch.where(ids >= 0, ids + off_c, ids))
        start_s, start_t = chunk_starts(chunks["chunk_s"], chunks["chunk_t"])
        c["start_s"].append(start_s + off_s)
        c["start_t"].append(start_t + off_t)
        off_c += max([int(ids.max()) for ids in chunks.values() if len(ids)] + [-1]) + 1
        off_s += n_s
        off_t += n_t
    tb = TeacherBatch(**{k: (torch.cat(v) if v else None) for k, v in parts.items()})
    return tb, CrossBatch(**{k: torch.cat(v).long() for k, v in c.items()})

"""On-policy batches: the student samples responses to a batch's prompts and the live teacher
scores them, with the same forward function stage one uses (:class:`~dskd_batch.teacher.forward.TeacherForward`
through :class:`~dskd_batch.train.batches.LiveTeacher`), so the records it returns are the cache
reader's records and the methods cannot tell them apart.

Whether a step is on-policy is a pure function of (seed, epoch, step in epoch): every process
agrees without communication and a resumed run makes the same choices. Sampling (temperature 1,
top-p 1, up to the cache's length limit) is seeded per (seed, epoch, step, process, micro-batch)
inside a forked RNG, so it neither depends on nor disturbs the training RNG. With a student of
another tokenizer the sampled text is tokenized for the teacher (with the teacher's prompt from the
cache) and aligned exactly as ``dskd-batch align`` does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .batches import LiveTeacher, Record
from ..data import Encoded, encode
from ..generation import SamplingSettings, sample_responses


@dataclass
class OnPolicySettings:
    ratio: float
    after_epochs: int
    max_len: int
    max_prompt_len: int
    template: str
    seed: int


@dataclass
class CrossTokenizer:
    """What re-tokenizing and aligning a sample for a teacher of another tokenizer needs."""

    teacher_tok: Any
    t_table: Any
    s_table: Any
    t2s: np.ndarray
    t_swap: np.ndarray  # the teacher vocabulary's space swap (cache.align.space_swap)


@dataclass
class OnPolicyStats:
    steps: int = 0
    samples: int = 0
    sample_tokens: int = 0
    teacher_seconds: float = 0.0
    sample_seconds: float = 0.0


class OnPolicy:
    """Samples with ``student``. Under FSDP that is an unsharded copy of the student, and ``refresh``
    (set by the caller) gathers the sharded weights into it once per optimizer step, before the
    step's first sample: every process calls it at the same point, since whether a step is
    on-policy is the same on every process."""

    def __init__(self, student: Any, student_tok: Any, live: LiveTeacher, settings: OnPolicySettings,
                 cross: CrossTokenizer | None = None) -> None:
        self.student = student
        self.refresh: Any = None  # FSDP: () -> None, gathers the trained weights into self.student
        self._fresh_for: tuple[int, int] | None = None
        self.tok = student_tok
        self.live = live
        self.s = settings
        self.cross = cross
        self.stats = OnPolicyStats()

    def active(self, epoch: int, k: int) -> bool:
        """Is step k of this epoch on-policy?"""
        if epoch < self.s.after_epochs or self.s.ratio <= 0:
            return False
        g = torch.Generator().manual_seed((self.s.seed * 1_000_003 + epoch) * 1_000_033 + k)
        return bool(torch.rand(1, generator=g).item() < self.s.ratio)

    def _sample(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        caps = [max(1, self.s.max_len - 1 - len(p)) for p in prompts]
        was_training = self.student.training
        self.student.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                return sample_responses(self.student, prompts, pad_id=self.tok.pad_token_id, eos_id=self.tok.eos_token_id,
                                        settings=SamplingSettings(max(caps), 1.0, 1.0), max_new=caps, vocab=len(self.tok))
        finally:
            self.student.train(was_training)

    def records(self, recs: list[Record], epoch: int, k: int, rank: int, m: int) -> list[Record]:
        """On-policy records for the ground-truth records ``recs`` (one micro-batch)."""
        t0 = time.perf_counter()
        if self.refresh is not None and self._fresh_for != (epoch, k):
            self.refresh()
            self._fresh_for = (epoch, k)
        prompts = [r["input_ids"][: int(r["prompt_len"])].tolist() for r in recs]
        seed = (((self.s.seed * 7919 + epoch) * 104_729 + k) * 1_009 + rank) * 101 + m
        new = self._sample(prompts, seed)
        t1 = time.perf_counter()
        eos = self.tok.eos_token_id
        if self.cross is None:
            out = [{"input_ids": torch.tensor(p + n + [eos], dtype=torch.long), "prompt_len": len(p)}
                   for p, n in zip(prompts, new)]
            self.live.fill(out)
        else:
            out = self._cross_records(recs, prompts, new)
        st = self.stats
        st.samples += len(new)
        st.sample_tokens += sum(len(n) + 1 for n in new)
        st.sample_seconds += t1 - t0
        st.teacher_seconds += time.perf_counter() - t1
        return out

    def _cross_records(self, recs: list[Record], prompts: list[list[int]], new: list[list[int]]) -> list[Record]:
        from ..cache.align import align_example

        c = self.cross
        texts = [self.tok.decode(n, skip_special_tokens=True) or " " for n in new]
        t_encs = [encode(c.teacher_tok, r["prompt"], t, max_prompt_len=self.s.max_prompt_len,
                         max_len=self.s.max_len, template=self.s.template) for r, t in zip(recs, texts)]
        teacher = self.live.run([e.input_ids for e in t_encs], [e.targets() for e in t_encs])
        out = []
        for p, n, text, te, tr in zip(prompts, new, texts, t_encs, teacher):
            s_enc = Encoded(p + n + [self.tok.eos_token_id], len(p))
            a = align_example(text, te.input_ids, te.prompt_len, tr["argmax"].numpy(), s_enc, c.t_table, c.s_table,
                              c.t2s, c.t_swap)
            rec = dict(tr)
            rec.update(input_ids=torch.tensor(s_enc.input_ids, dtype=torch.long), prompt_len=s_enc.prompt_len,
                       teacher_input_ids=torch.tensor(te.input_ids, dtype=torch.long), teacher_prompt_len=te.prompt_len,
                       eta_s=torch.tensor(a.eta_s, dtype=torch.long), eta_t=torch.tensor(a.eta_t, dtype=torch.long),
                       eta_label=torch.tensor(a.eta_label, dtype=torch.long),
                       eta_shift=torch.tensor(a.eta_shift, dtype=torch.long),
                       mined_t=torch.tensor(a.mined_t, dtype=torch.long),
                       chunk_s=torch.tensor(a.chunk_s, dtype=torch.long), chunk_t=torch.tensor(a.chunk_t, dtype=torch.long))
            out.append(rec)
        return out

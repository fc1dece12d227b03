"""The cross-vocabulary methods (a student with another tokenizer; see :mod:`dskd_batch.methods` for
the same-vocabulary ones and the formulas): DSKD with exact token alignment (``dskd-eta``), DSKD
with cross-model attention (``dskd-cma``), MinED and ULD. Their inputs are the teacher's record at
the teacher's target positions and a :class:`CrossBatch` that says how the two sides' positions
pair up, made from the cache's alignment sidecar (:mod:`dskd_batch.cache.align`) by
:mod:`dskd_batch.train.aligned`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..losses import fkl, masked_sum, token_ce
from .same_vocab import LossInputs, LossSettings, Method, TeacherBatch, dskd_terms


@dataclass
class CrossBatch:
    """How a micro-batch's N student and M teacher response positions align (flat indices)."""

    eta_s: Tensor  # [P] student positions of ETA pairs
    eta_t: Tensor  # [P] teacher positions of ETA pairs
    eta_label: Tensor  # [P] student id of the teacher's top-1 (-1: no single student token)
    eta_shift: Tensor  # [P] 1 where the pair's tokens differ by a dummy-prefix space (read through the space swap)
    mined_t: Tensor  # [N] teacher position matched by MinED (-1: none)
    uld_s: Tensor  # [Q] k-th student response position of each example ...
    uld_t: Tensor  # [Q] ... with the k-th teacher one
    seg_s: Tensor  # [N] example of each student position
    seg_t: Tensor  # [M] example of each teacher position
    s_inputs: Tensor  # [N] student input token at each student position
    t_inputs: Tensor  # [M] teacher input token at each teacher position
    t_targets: Tensor  # [M] teacher target token at each teacher position
    chunk_s: Tensor  # [N] ALM chunk of each student position (unique in the micro-batch; -1: none)
    chunk_t: Tensor  # [M] ALM chunk of each teacher position
    start_s: Tensor  # [R] student positions that begin an ALM chunk with more than one token on a side ...
    start_t: Tensor  # [R] ... and the teacher position that begins it (the same text before both)

    def to(self, device: torch.device) -> "CrossBatch":
        return CrossBatch(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})

    def student_rows(self, part: slice) -> "CrossBatch":
        """The alignment of the student positions ``part`` only, re-indexed from ``part.start`` (the
        teacher side stays whole): what a chunk of a per-position method reads."""
        lo, hi = part.start, part.stop
        e = (self.eta_s >= lo) & (self.eta_s < hi)
        u = (self.uld_s >= lo) & (self.uld_s < hi)
        r = (self.start_s >= lo) & (self.start_s < hi)
        return CrossBatch(self.eta_s[e] - lo, self.eta_t[e], self.eta_label[e], self.eta_shift[e], self.mined_t[part],
                          self.uld_s[u] - lo,
                          self.uld_t[u], self.seg_s[part], self.seg_t, self.s_inputs[part], self.t_inputs,
                          self.t_targets, self.chunk_s[part], self.chunk_t, self.start_s[r] - lo, self.start_t[r])


class CrossVocabMethod(Method):
    """Base of the methods for a student with another tokenizer (see the module docstring)."""

    needs_teacher = True
    cross_vocab = True
    per_position = True  # sums over student positions or pairs (CrossBatch.student_rows cuts them); not CMA
    logit_sets = 2  # the student's and the teacher's

    def __init__(self, ls: LossSettings) -> None:
        super().__init__(ls)
        self.s2t_vocab: Tensor | None = None  # [V_S] teacher id of the same text, -1 if none
        self.t_swap: Tensor | None = None  # [V_T] the teacher vocabulary's space swap (None: identity)
        self.s_swap: Tensor | None = None  # [V_S] the student's

    def prepare(self, cache: Any, alignment: Any | None) -> None:
        self.s2t_vocab = alignment.s2t
        self.t_swap, self.s_swap = alignment.t_swap, alignment.s_swap

    def teacher_at_pairs(self, x: LossInputs, tp: TeacherBatch, shift: Tensor) -> Tensor:
        """The teacher's logits at the pairs' teacher rows ``tp``, read through the space swap at the
        shifted pairs (there the teacher's ``The`` stands for the student's ``▁The``)."""
        return swap_columns(x.head.logits(tp), shift, self.t_swap)

    def losses(self, x: LossInputs) -> dict[str, Tensor]:
        x = x.sliced()
        return self.combine(token_ce(x.s, x.targets).sum(), self.kd_terms(x))

    def kd_terms(self, x: LossInputs) -> dict[str, Tensor]:
        """The KD terms (``kd``: their sum) from inputs already cut to the student's vocabulary."""
        raise NotImplementedError


def swap_columns(logits: Tensor, rows: Tensor, swap: Tensor | None) -> Tensor:
    """``logits`` with the columns of the rows ``rows`` (bool or 0/1) permuted by the space swap
    ``swap`` (an involution over the tokenizer's ids; ids past it, a padded head's, stay)."""
    rows = rows.bool()
    if swap is None or not bool(rows.any()):
        return logits
    width = logits.shape[-1]
    perm = torch.arange(width, device=logits.device)
    n = min(width, len(swap))
    perm[:n] = swap[:n].to(logits.device)
    out = logits.clone()
    out[rows] = logits[rows][:, perm]
    return out


def trusted_pairs(x: LossInputs, keep_pairs: Tensor) -> tuple[Tensor, Tensor]:
    """``kd_positions = "teacher-correct"`` across vocabularies: the pairs whose teacher top-1 (in the
    student's vocabulary) is the student's target, and the sum of the CE at every other student
    position (unpaired, or the teacher wrong), which then trains on the label at full weight."""
    cross = x.cross
    ps = cross.eta_s[keep_pairs]
    ok = cross.eta_label[keep_pairs] == x.targets[ps]
    trusted = torch.zeros(len(x.targets), dtype=torch.bool, device=x.s.device)
    trusted[ps[ok]] = True
    return ok, masked_sum(token_ce(x.s, x.targets), ~trusted)


class DSKDETA(CrossVocabMethod):
    name = "dskd-eta"
    needs_hidden = True
    dual_space = True
    teacher_correct = True
    logit_sets = 4  # the student's, the teacher's, and both projections to full vocabularies

    def projector_spec(self) -> dict[str, bool]:
        return {"t2s": self.ls.student_space, "s2t": self.ls.teacher_space}

    def kd_terms(self, x: LossInputs) -> dict[str, Tensor]:
        cross = x.cross
        keep = cross.eta_label >= 0
        ps, pt, label, shift = cross.eta_s[keep], cross.eta_t[keep], cross.eta_label[keep], cross.eta_shift[keep]
        tp = x.teacher.rows(pt)
        ok, label_ce = trusted_pairs(x, keep) if self.ls.kd_positions == "teacher-correct" else (None, None)
        terms = dskd_terms(x.s[ps], x.h_s[ps], label, self.teacher_at_pairs(x, tp, shift), tp.hidden, label,
                           x.projector("t2s"), x.projector("s2t"), x.student_head, x.head, self.ls, ok,
                           t2s_view=lambda z: swap_columns(z, shift, self.s_swap))
        if label_ce is not None:  # the label at full weight where the teacher gives no trusted pair
            terms["kd"] = terms["kd"] + label_ce
            terms["kd_kept"] = ok.sum().float()
        s2t = x.projector("s2t")
        if self.ls.kd_positions == "span-starts" and s2t is not None:
            # a student token that starts where a teacher token starts but spans other bytes (GPT-2's " 14"
            # against SmolLM2's " 1" "4"): both models have read the same text, so the teacher's next-token
            # distribution is a target in the teacher's space; the student's space has no counterpart token
            starts = masked_sum(fkl(x.head.project(s2t(x.h_s[cross.start_s])), x.head.logits(x.teacher.rows(cross.start_t)),
                                    temperature=self.ls.temperature), torch.ones_like(cross.start_s, dtype=torch.bool))
            terms["kd"] = terms["kd"] + starts
            terms.update(start_kd=starts.detach(), starts=torch.tensor(float(len(cross.start_s)), device=x.s.device))
        terms["aligned"] = torch.tensor(float(len(ps)), device=x.s.device)
        return terms


class DSKDCMA(CrossVocabMethod):
    name = "dskd-cma"
    per_position = False  # its attention spans every position of an example
    needs_hidden = True
    needs_norm_stats = True
    needs_embeddings = True
    dual_space = True
    pinv_projectors = False  # its value projector reads normalised embeddings + hidden states

    def __init__(self, ls: LossSettings) -> None:
        super().__init__(ls)
        self.norm: dict[str, float] = {}  # stds of the teacher's embeddings and hidden states

    def prepare(self, cache: Any, alignment: Any | None) -> None:
        super().prepare(cache, alignment)
        ns = cache.manifest["norm_stats"]
        self.norm = {"index_std": ns["index_embed"]["std"], "target_std": ns["target_embed"]["std"],
                     "hidden_std": ns["hidden"]["std"]}

    def projector_spec(self) -> dict[str, bool]:
        return {"t2s": self.ls.student_space, "s2t": self.ls.teacher_space, "query": True}

    def attention_scores(self, q_proj: nn.Module, e_s: Tensor, e_t: Tensor, cross: CrossBatch,
                         targets: Tensor) -> Tensor:
        """[N, M] scores Q K^T / sqrt(2 d_T), -inf across examples."""
        q = q_proj(torch.cat([e_s[cross.s_inputs], e_s[targets]], -1).to(q_proj.weight.dtype)).float()
        k = torch.cat([e_t[cross.t_inputs], e_t[cross.t_targets]], -1) / self.norm["index_std"]
        scores = q @ k.T / math.sqrt(k.shape[-1])
        return scores.masked_fill(cross.seg_s[:, None] != cross.seg_t[None, :], float("-inf"))

    def kd_terms(self, x: LossInputs) -> dict[str, Tensor]:
        s, h_s, targets, tb, head, cross = x.s, x.h_s, x.targets, x.teacher, x.head, x.cross
        student_head = x.student_head
        if head.embed is None or x.student_embed is None:
            raise ValueError("dskd-cma needs the teacher's and the student's input embeddings")
        e_s, e_t = x.student_embed.detach().float(), head.embed
        scores = self.attention_scores(x.projectors["query"], e_s, e_t, cross, targets)
        out: dict[str, Tensor] = {}
        kd = s.new_zeros((), dtype=torch.float32)
        t2s, s2t = x.projector("t2s"), x.projector("s2t")
        if t2s is not None:
            v_in = e_t[cross.t_targets] / self.norm["target_std"] + tb.hidden.float() / self.norm["hidden_std"]
            v = t2s(v_in.to(t2s.weight.dtype)).float()
            t2s_logits = (torch.softmax(scores, -1) @ v) @ student_head.detach().float().T
            t2s_ce = token_ce(t2s_logits, targets).sum()
            pred = t2s_logits.argmax(-1)
            keep = pred == targets if self.ls.agreement_mask else torch.ones_like(targets, dtype=torch.bool)
            t2s_kd = masked_sum(self.ls.dist(s, t2s_logits.detach()), keep)
            kd = kd + t2s_ce + t2s_kd
            out.update(t2s_ce=t2s_ce.detach(), t2s_kd=t2s_kd.detach(), t2s_acc=(pred == targets).sum().float())
        if s2t is not None:
            aligned = torch.softmax(scores.T, -1) @ s2t(h_s).float()
            s2t_logits = head.project(aligned)
            s2t_kd = fkl(s2t_logits, head.logits(tb), temperature=self.ls.temperature).sum()
            kd = kd + s2t_kd
            out.update(s2t_kd=s2t_kd.detach(), s2t_acc=(s2t_logits.argmax(-1) == cross.t_targets).sum().float())
        out["kd"] = kd
        return out


NEG = -1e4  # logit of "no mass": exp underflows to exactly 0 in fp32 at any temperature >= 0.1


def mined_teacher_logits(t_logits: Tensor, s2t_vocab: Tensor, v_s: int) -> Tensor:
    """Teacher logits [A, V_T] carried into the student vocabulary [A, V_S] through the token map."""
    out = t_logits.new_full((t_logits.shape[0], v_s), NEG)
    cols = torch.nonzero(s2t_vocab[:v_s] >= 0).flatten()
    out[:, cols] = t_logits[:, s2t_vocab[cols]]
    return out


class MinED(CrossVocabMethod):
    name = "mined"

    def kd_terms(self, x: LossInputs) -> dict[str, Tensor]:
        s, targets, tb, head, cross = x.s, x.targets, x.teacher, x.head, x.cross
        aligned = cross.mined_t >= 0
        teacher = torch.full_like(s, NEG).float()
        teacher[torch.arange(len(targets), device=s.device), targets] = 0.0  # one-hot ground truth
        if aligned.any():
            t_logits = head.logits(tb.rows(cross.mined_t[aligned]))
            teacher[aligned] = mined_teacher_logits(t_logits, self.s2t_vocab.to(s.device), s.shape[-1])
        kd = fkl(s, teacher, temperature=self.ls.temperature).sum()
        return {"kd": kd, "aligned": aligned.sum().float()}


def uld_distance(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    """Per-row L1 distance between the sorted probability vectors, zero-padded to one length."""
    q = torch.softmax(s.float() / temperature, -1).sort(-1, descending=True).values
    p = torch.softmax(t.float() / temperature, -1).sort(-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    return (q - p).abs().sum(-1)


class ULD(CrossVocabMethod):
    name = "uld"

    def kd_terms(self, x: LossInputs) -> dict[str, Tensor]:
        cross = x.cross
        t_logits = x.head.logits(x.teacher.rows(cross.uld_t))
        kd = uld_distance(x.s[cross.uld_s], t_logits, self.ls.temperature).sum()
        return {"kd": kd, "aligned": torch.tensor(float(len(cross.uld_s)), device=x.s.device)}


def one_to_one(s2t_vocab: Tensor, v_s: int, v_t: int) -> tuple[Tensor, Tensor]:
    """The student and teacher ids of the tokens that map one-to-one between the vocabularies (the same
    bytes on both sides; a teacher id reached from two student ids keeps the first)."""
    ms = torch.nonzero((s2t_vocab[:v_s] >= 0) & (s2t_vocab[:v_s] < v_t)).flatten()
    mt = s2t_vocab[ms]
    first = torch.ones_like(mt, dtype=torch.bool)
    if len(mt):
        order = torch.argsort(mt * (len(ms) + 1) + torch.arange(len(ms)), stable=True)
        dup = torch.zeros_like(first)
        dup[order[1:]] = mt[order[1:]] == mt[order[:-1]]
        first = ~dup
    return ms[first], mt[first]


def gold_distance(s: Tensor, t: Tensor, ms: Tensor, mt: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Per row: (forward KL over the one-to-one tokens ``ms``/``mt``, taken on the two full
    distributions' probabilities of those tokens, and ULD's L1 between the sorted probabilities of
    every other token of each vocabulary, zero-padded to one length)."""
    logq = torch.log_softmax(s.float() / temperature, -1)
    logp = torch.log_softmax(t.float() / temperature, -1)
    lq, lp = logq[:, ms], logp[:, mt]
    pm = lp.exp()
    kl = torch.where(pm > 0, pm * (lp - lq), torch.zeros_like(pm)).sum(-1)
    keep_s = torch.ones(s.shape[-1], dtype=torch.bool, device=s.device)
    keep_t = torch.ones(t.shape[-1], dtype=torch.bool, device=t.device)
    keep_s[ms], keep_t[mt] = False, False
    q = logq[:, keep_s].exp().sort(-1, descending=True).values
    p = logp[:, keep_t].exp().sort(-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    return kl, (q - p).abs().sum(-1)


class GOLD(CrossVocabMethod):
    """GOLD (TRL's hybrid of ULD): at the positions where student and teacher predict the next token
    from the same text (the ETA pairs), a forward KL over the tokens that map one-to-one between the
    vocabularies plus ULD's sorted-probability L1 over the tokens that do not; the two weighted by the
    share of the teacher's vocabulary that maps (TRL's default weighting). Other student positions
    get the label term alone."""

    name = "gold"
    teacher_correct = True

    def __init__(self, ls: LossSettings) -> None:
        super().__init__(ls)
        self._matched: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # (V_S, V_T) -> one-to-one ids

    def kd_terms(self, x: LossInputs) -> dict[str, Tensor]:
        cross = x.cross
        t_logits = self.teacher_at_pairs(x, x.teacher.rows(cross.eta_t), cross.eta_shift)
        key = (x.s.shape[-1], t_logits.shape[-1])
        if key not in self._matched:
            self._matched[key] = one_to_one(self.s2t_vocab, *key)
        ms, mt = (m.to(x.s.device) for m in self._matched[key])
        w = len(mt) / key[1]
        kl, l1 = gold_distance(x.s[cross.eta_s], t_logits, ms, mt, self.ls.temperature)
        per_pair = w * kl + (1 - w) * l1
        if self.ls.kd_positions == "teacher-correct":  # the label at full weight where no trusted pair
            ok, label_ce = trusted_pairs(x, torch.ones_like(cross.eta_s, dtype=torch.bool))
            return {"kd": masked_sum(per_pair, ok) + label_ce, "kd_kept": ok.sum().float(),
                    "matched_kl": kl.sum().detach(), "unmatched_l1": l1.sum().detach(),
                    "aligned": torch.tensor(float(len(cross.eta_s)), device=x.s.device)}
        return {"kd": per_pair.sum(), "matched_kl": kl.sum().detach(),
                "unmatched_l1": l1.sum().detach(), "aligned": torch.tensor(float(len(cross.eta_s)), device=x.s.device)}


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stably (and finite at x = 0: the chunk is then certain)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binary_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL between the Bernoulli distributions of probability exp(log_p) and exp(log_q)."""
    p = log_p.exp()
    return p * (log_p - log_q) + (1 - p) * (log1mexp(log_p) - log1mexp(log_q))


def chunk_kl(log_p: Tensor, log_q: Tensor, tau: float) -> Tensor:
    """ALM's loss per chunk: the binarised KL of the teacher's and the student's chunk log-likelihoods
    at the binarisation temperature ``tau`` (each likelihood raised to 1/tau, kept just below 1)."""
    eps = 1e-6
    return binary_kl(log_p / tau - eps, log_q / tau - eps)


class ALM(CrossVocabMethod):
    """ALM, approximate likelihood matching (Minixhofer et al., 2025): for each aligned chunk (a span of
    the response both tokenizations cut at the same bytes, from the alignment sidecar), the teacher's
    and the student's likelihood of the chunk (the product of each model's probabilities of its own
    tokens there) are matched with the binarised KL of the reference implementation (tokenkit):
    KL(Bernoulli(p_T^(1/tau)) || Bernoulli(p_S^(1/tau))) with the binarisation temperature tau
    (``--alm-tau``, 100 as in the reference; without it a chunk of a few unlikely tokens has a
    likelihood near 0 on both sides and the loss no gradient). It needs only each model's
    log-probability of its own next tokens, which the cache holds exactly; ``--temperature`` does not
    apply. A chunk spans several student positions, so the loss runs in one piece."""

    name = "alm"
    per_position = False

    def kd_terms(self, x: LossInputs) -> dict[str, Tensor]:
        cross = x.cross
        lq = torch.log_softmax(x.s.float(), -1).gather(-1, x.targets[:, None]).squeeze(-1)  # [N]
        t_logits = x.head.logits(x.teacher)
        lp = torch.log_softmax(t_logits.float(), -1).gather(-1, cross.t_targets[:, None]).squeeze(-1)  # [M]
        n = int(max(int(cross.chunk_s.max()) if len(cross.chunk_s) else -1,
                    int(cross.chunk_t.max()) if len(cross.chunk_t) else -1)) + 1
        zero = x.s.new_zeros((), dtype=torch.float32)
        if n == 0:
            return {"kd": zero + 0 * lq.sum(), "chunks": zero.detach(), "aligned": zero.detach()}
        ks, kt = cross.chunk_s >= 0, cross.chunk_t >= 0
        chunk_q = lq.new_zeros(n).index_add(0, cross.chunk_s[ks], lq[ks])
        chunk_p = lp.new_zeros(n).index_add(0, cross.chunk_t[kt], lp[kt])
        present = torch.zeros(n, dtype=torch.bool, device=lq.device)
        present[cross.chunk_s[ks]] = True
        both = present & torch.zeros(n, dtype=torch.bool, device=lq.device).index_fill(0, cross.chunk_t[kt], True)
        kd = chunk_kl(chunk_p[both].detach(), chunk_q[both], self.ls.alm_tau).sum()
        return {"kd": kd, "chunks": both.sum().float(), "aligned": (ks & both[cross.chunk_s.clamp(min=0)]).sum().float(),
                "chunk_nll_gap": (chunk_p[both] - chunk_q[both]).sum().detach()}

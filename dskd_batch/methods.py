"""Distillation methods: what each one computes from the student's outputs and a teacher batch.

A method sees only response positions (the positions whose next token is a response token), as
flat tensors: student logits ``s`` [N, V] and head inputs ``h_s`` [N, d_S], targets [N], and a
:class:`TeacherBatch` with the teacher's record at the same positions. It returns **sums** over
positions (``objective`` and one entry per term, for logging); the training loop divides the
objective by the number of response tokens of the whole optimizer step. Whether the teacher batch
came from a cache or from a live teacher is invisible here.

Same-vocabulary methods (teacher and student share the tokenizer; see ``../shared/DESIGN.md`` §4):

- ``sft`` / ``seqkd``: CE on the targets (seqkd's targets are the teacher's own responses).
- ``kd``: (1 - r) CE + r D(p_T || q_S) at temperature T.
- ``dskd``: (1 - r) CE + r (CE_t2s + KD_student + KD_teacher), where
  t2s logits = P_t2s(h_T) W_S^T with W_S detached (CE_t2s trains only the projector),
  KD_student = D(p_t2s || q_S) with p_t2s detached (optionally only where argmax t2s equals the
  teacher's argmax), KD_teacher = FKL(p_T || q_s2t), s2t logits = P_s2t(h_S) W_T^T with W_T
  frozen; the teacher-space term is a forward KL whatever D is, as in the reference.

Cross-vocabulary methods (the student has another tokenizer; the teacher batch holds the M
teacher response positions of the same examples and a :class:`CrossBatch` says how they align,
from the cache's alignment sidecar, see :mod:`dskd_batch.align`). CE is always on the student's
own ground truth at every student position; sums are normalised by the student's response tokens.

- ``dskd-eta``: DSKD on ETA pairs (same text at the same offset) whose teacher top-1 token is a
  single student token; the t2s CE targets that mapped top-1 and ``--agreement-mask`` compares the
  t2s argmax with it (DSKDv2's exact-token alignment).
- ``dskd-cma``: DSKD with cross-model attention (first paper, section 3.2). Queries
  P_q([E_S(x); E_S(y)]), keys [E_T(x); E_T(y)] / std, values P_t2s(E_T(y) / std + h_T / std);
  attention is restricted to the same example's response positions. The stds are over real
  tokens of the whole corpus, recorded in the cache (the reference takes them over the padded
  batch). Student space: CE_t2s on the targets and D(p_t2s || q_S) (with ``--agreement-mask``,
  only where the t2s argmax is the target); teacher space: the transposed attention aligns
  P_s2t(h_S) to the teacher positions, FKL(p_T || q_s2t).
- ``mined``: FuseLLM's minimum-edit-distance alignment; at a student position matched one-to-one
  to a teacher position with the same text, the teacher's logits mapped into the student
  vocabulary through the token map (tokens without a counterpart get no mass); elsewhere the
  one-hot ground truth, as in the reference. Forward KL, whatever ``--distance`` says.
- ``uld``: Universal Logit Distillation: the k-th response position of the student with the k-th
  of the teacher, both distributions sorted, zero-padded to one length, L1 distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .losses import distance, fkl, masked_sum, token_ce, with_plugins
from .teacher import assemble_logits

Tensor = torch.Tensor
KD_GRAD = "_kd"  # the KD sum with its graph (on-policy steps combine it with CE from another batch); not logged


@dataclass
class TeacherBatch:
    """The teacher's record at N response positions (any field may be None if not available)."""

    hidden: Tensor | None = None  # [N, d_T]
    topk_values: Tensor | None = None  # [N, k]
    topk_indices: Tensor | None = None  # [N, k]
    logsumexp: Tensor | None = None  # [N]
    argmax: Tensor | None = None  # [N]
    logits: Tensor | None = None  # [N, V_T] when the source gave real logits

    def to(self, device: torch.device) -> "TeacherBatch":
        return TeacherBatch(**{k: (v.to(device, non_blocking=True) if v is not None else None)
                               for k, v in self.__dict__.items()})

    def rows(self, idx: Tensor) -> "TeacherBatch":
        """The record at the positions ``idx``."""
        return TeacherBatch(**{k: (v[idx] if v is not None else None) for k, v in self.__dict__.items()})


@dataclass
class CrossBatch:
    """How a micro-batch's N student and M teacher response positions align (flat indices)."""

    eta_s: Tensor  # [P] student positions of ETA pairs
    eta_t: Tensor  # [P] teacher positions of ETA pairs
    eta_label: Tensor  # [P] student id of the teacher's top-1 (-1: no single student token)
    mined_t: Tensor  # [N] teacher position matched by MinED (-1: none)
    uld_s: Tensor  # [Q] k-th student response position of each example ...
    uld_t: Tensor  # [Q] ... with the k-th teacher one
    seg_s: Tensor  # [N] example of each student position
    seg_t: Tensor  # [M] example of each teacher position
    s_inputs: Tensor  # [N] student input token at each student position
    t_inputs: Tensor  # [M] teacher input token at each teacher position
    t_targets: Tensor  # [M] teacher target token at each teacher position

    def to(self, device: torch.device) -> "CrossBatch":
        return CrossBatch(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})


class TeacherHead:
    """The frozen teacher head W_T (and bias) and the rule that turns a batch into full logits."""

    def __init__(self, weight: Tensor, bias: Tensor | None, logits_source: str, embed: Tensor | None = None) -> None:
        self.weight = weight.detach().float()  # frozen: never part of the autograd graph
        self.bias = bias.detach().float() if bias is not None else None
        self.logits_source = logits_source
        self.embed = embed.detach().float() if embed is not None else None  # E_T, for CMA

    def to(self, device: torch.device) -> "TeacherHead":
        return TeacherHead(self.weight.to(device), self.bias.to(device) if self.bias is not None else None,
                           self.logits_source, self.embed.to(device) if self.embed is not None else None)

    def project(self, h: Tensor) -> Tensor:
        """h @ W_T^T (+ b): logits of teacher-space states (gradient flows into h only)."""
        out = h.float() @ self.weight.T
        return out + self.bias if self.bias is not None else out

    @torch.no_grad()
    def logits(self, tb: TeacherBatch) -> Tensor:
        if tb.logits is not None:
            return tb.logits.float()
        if self.logits_source == "hidden":
            return self.project(tb.hidden)
        if tb.topk_values is None:
            raise ValueError("the teacher batch has neither exact hidden states nor top-k logits")
        n = tb.topk_values.shape[0]
        approx = (self.project(tb.hidden) if self.logits_source == "assembled"
                  else torch.zeros(n, self.weight.shape[0], device=self.weight.device))
        return assemble_logits(approx, tb.topk_values, tb.topk_indices, tb.logsumexp)


@dataclass(frozen=True)
class LossSettings:
    distance: str = "fkl"
    temperature: float = 2.0
    kd_rate: float = 0.5
    agreement_mask: bool = False
    student_space: bool = True
    teacher_space: bool = True
    distance_args: tuple[tuple[str, Any], ...] = ()  # the distance's own hyper-parameters (losses.DISTANCES)

    def dist(self, s: Tensor, t: Tensor) -> Tensor:
        return distance(self.distance)(s, t, temperature=self.temperature, **dict(self.distance_args))


@dataclass
class LossInputs:
    """What a method's loss reads, for the N response positions of a micro-batch (or of a chunk)."""

    s: Tensor  # [N, V_S'] student logits, fp32 (V_S' >= vocab: a padded head's rows included)
    h_s: Tensor  # [N, d_S] the student's head inputs
    targets: Tensor  # [N] target token ids
    teacher: TeacherBatch | None  # the teacher's record at the teacher's positions
    head: TeacherHead | None  # the frozen teacher head
    projectors: nn.ModuleDict  # the method's projectors (t2s, s2t, query), trained or frozen
    student_head: Tensor  # W_S [V_S', d_S]
    vocab: int  # the student tokenizer's size: logits and head rows beyond it are cut
    cross: CrossBatch | None = None  # the alignment, for a student with another tokenizer
    student_embed: Tensor | None = None  # E_S, for methods that need it (needs_embeddings)

    def projector(self, name: str) -> nn.Module | None:
        return self.projectors[name] if name in self.projectors else None

    def sliced(self) -> "LossInputs":
        """The same inputs with the student logits and head cut to the real vocabulary."""
        return replace(self, s=self.s[:, :self.vocab], student_head=self.student_head[:self.vocab])


class Method:
    """Base: supervised fine-tuning (CE on the targets)."""

    name = "sft"
    # What the method needs; config validation, source selection and refusals read these, so a
    # method registered in METHOD_CLASSES (or through the `dskd_batch.methods` entry points) runs
    # with `distill --method NAME` and no other edit.
    needs_teacher = False  # a teacher distribution (cache or live)
    needs_hidden = False  # the teacher's hidden states (a cache with --hidden other than none)
    needs_generation = False  # a cache whose responses the teacher generated (cache-teacher --generate)
    needs_norm_stats = False  # the cache's normalisation statistics of teacher embeddings and states
    needs_embeddings = False  # the teacher's and the student's input embeddings
    cross_vocab = False  # for a student with another tokenizer (reads the cache's alignment)
    dual_space = False  # has DSKD's projectors (the ablation flags and --projector-lr 0 apply)
    pinv_projectors = True  # --projector-init pinv can solve its projectors
    per_position = True  # the loss is a sum of terms of single positions (so it can be computed in chunks)

    def __init__(self, ls: LossSettings) -> None:
        self.ls = ls

    def prepare(self, cache: Any, alignment: Any | None) -> None:
        """Take what the method needs from the teacher cache (and its alignment for the student)."""

    def projector_spec(self) -> dict[str, bool]:
        return {"t2s": False, "s2t": False}

    def losses(self, x: LossInputs) -> dict[str, Tensor]:
        """Sums over the positions: ``objective`` (what is minimised), ``ce`` and the logged terms."""
        ce = token_ce(x.s[:, :x.vocab], x.targets).sum()
        return {"objective": ce, "ce": ce.detach()}

    def combine(self, ce: Tensor, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """(1 - r) CE + r KD, and every term for logging (``terms["kd"]`` is the KD sum)."""
        r = self.ls.kd_rate
        kd = terms.pop("kd")
        return {"objective": (1 - r) * ce + r * kd, "ce": ce.detach(), "kd": kd.detach(), KD_GRAD: kd, **terms}


class SeqKD(Method):
    name = "seqkd"
    needs_generation = True


class VanillaKD(Method):
    name = "kd"
    needs_teacher = True

    def losses(self, x: LossInputs) -> dict[str, Tensor]:
        s = x.s[:, :x.vocab]
        ce = token_ce(s, x.targets).sum()
        return self.combine(ce, {"kd": self.ls.dist(s, x.head.logits(x.teacher)[:, :x.vocab]).sum()})


def dskd_terms(s: Tensor, h_s: Tensor, targets: Tensor, t_logits: Tensor, h_t: Tensor, t_argmax: Tensor,
               t2s: nn.Module | None, s2t: nn.Module | None, student_head: Tensor, head: TeacherHead,
               ls: LossSettings) -> dict[str, Tensor]:
    """The DSKD terms as sums over positions (see the module docstring)."""
    out: dict[str, Tensor] = {}
    zero = s.new_zeros((), dtype=torch.float32)
    kd = zero
    if t2s is not None:
        t2s_logits = t2s(h_t.to(s.dtype)).float() @ student_head.detach().float().T
        t2s_ce = token_ce(t2s_logits, targets).sum()
        pred = t2s_logits.argmax(-1)
        keep = pred == t_argmax if ls.agreement_mask else torch.ones_like(targets, dtype=torch.bool)
        t2s_kd = masked_sum(ls.dist(s, t2s_logits.detach()), keep)
        kd = kd + t2s_ce + t2s_kd
        out.update(t2s_ce=t2s_ce.detach(), t2s_kd=t2s_kd.detach(),
                   t2s_acc=(pred == targets).sum().float(), t2s_agree=(pred == t_argmax).sum().float())
    if s2t is not None:
        s2t_logits = head.project(s2t(h_s))
        s2t_kd = fkl(s2t_logits, t_logits, temperature=ls.temperature).sum()
        kd = kd + s2t_kd
        out.update(s2t_kd=s2t_kd.detach(), s2t_acc=(s2t_logits.argmax(-1) == targets).sum().float())
    out["kd"] = kd
    return out


class DSKD(Method):
    name = "dskd"
    needs_teacher = True
    needs_hidden = True
    dual_space = True

    def projector_spec(self) -> dict[str, bool]:
        return {"t2s": self.ls.student_space, "s2t": self.ls.teacher_space}

    def losses(self, x: LossInputs) -> dict[str, Tensor]:
        x = x.sliced()
        ce = token_ce(x.s, x.targets).sum()
        t_logits = x.head.logits(x.teacher)[:, :x.vocab]
        terms = dskd_terms(x.s, x.h_s, x.targets, t_logits, x.teacher.hidden, x.teacher.argmax, x.projector("t2s"),
                           x.projector("s2t"), x.student_head, _sliced(x.head, x.vocab), self.ls)
        return self.combine(ce, terms)


def _sliced(head: TeacherHead, vocab: int) -> TeacherHead:
    if head.weight.shape[0] == vocab:
        return head
    return TeacherHead(head.weight[:vocab], head.bias[:vocab] if head.bias is not None else None, head.logits_source)


class CrossVocabMethod(Method):
    """Base of the methods for a student with another tokenizer (see the module docstring)."""

    needs_teacher = True
    cross_vocab = True
    per_position = False  # pairs, attention and sorted positions span an example

    def __init__(self, ls: LossSettings) -> None:
        super().__init__(ls)
        self.s2t_vocab: Tensor | None = None  # [V_S] teacher id of the same text, -1 if none

    def prepare(self, cache: Any, alignment: Any | None) -> None:
        self.s2t_vocab = alignment.s2t

    def losses(self, x: LossInputs) -> dict[str, Tensor]:
        x = x.sliced()
        return self.combine(token_ce(x.s, x.targets).sum(), self.kd_terms(x))

    def kd_terms(self, x: LossInputs) -> dict[str, Tensor]:
        """The KD terms (``kd``: their sum) from inputs already cut to the student's vocabulary."""
        raise NotImplementedError


class DSKDETA(CrossVocabMethod):
    name = "dskd-eta"
    needs_hidden = True
    dual_space = True

    def projector_spec(self) -> dict[str, bool]:
        return {"t2s": self.ls.student_space, "s2t": self.ls.teacher_space}

    def kd_terms(self, x: LossInputs) -> dict[str, Tensor]:
        cross = x.cross
        keep = cross.eta_label >= 0
        ps, pt, label = cross.eta_s[keep], cross.eta_t[keep], cross.eta_label[keep]
        tp = x.teacher.rows(pt)
        terms = dskd_terms(x.s[ps], x.h_s[ps], label, x.head.logits(tp), tp.hidden, label, x.projector("t2s"),
                           x.projector("s2t"), x.student_head, x.head, self.ls)
        terms["aligned"] = torch.tensor(float(len(ps)), device=x.s.device)
        return terms


class DSKDCMA(CrossVocabMethod):
    name = "dskd-cma"
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


METHOD_CLASSES: dict[str, type[Method]] = {"sft": Method, "seqkd": SeqKD, "kd": VanillaKD, "dskd": DSKD,
                                           "dskd-eta": DSKDETA, "dskd-cma": DSKDCMA, "mined": MinED, "uld": ULD}


def method_classes() -> dict[str, type[Method]]:
    """The method registry, installed plug-ins (entry points ``dskd_batch.methods``: name -> Method
    subclass) included."""
    return with_plugins("dskd_batch.methods", METHOD_CLASSES)


def make_method(name: str, ls: LossSettings) -> Method:
    return method_classes()[name](ls)


def method_info(m: Method) -> dict[str, Any]:
    return {"name": m.name, **m.ls.__dict__}

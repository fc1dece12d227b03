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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .losses import distance, fkl, masked_sum, token_ce
from .teacher import assemble_logits

Tensor = torch.Tensor


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


class TeacherHead:
    """The frozen teacher head W_T (and bias) and the rule that turns a batch into full logits."""

    def __init__(self, weight: Tensor, bias: Tensor | None, logits_source: str) -> None:
        self.weight = weight.detach().float()  # frozen: never part of the autograd graph
        self.bias = bias.detach().float() if bias is not None else None
        self.logits_source = logits_source

    def to(self, device: torch.device) -> "TeacherHead":
        return TeacherHead(self.weight.to(device), self.bias.to(device) if self.bias is not None else None,
                           self.logits_source)

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
    skew_lambda: float = 0.1
    akl_alpha: float = 0.5
    agreement_mask: bool = False
    student_space: bool = True
    teacher_space: bool = True

    def dist(self, s: Tensor, t: Tensor) -> Tensor:
        return distance(self.distance)(s, t, temperature=self.temperature, skew_lambda=self.skew_lambda,
                                       akl_alpha=self.akl_alpha)


class Method:
    """Base: supervised fine-tuning (CE on the targets)."""

    name = "sft"
    needs_teacher = False
    needs_hidden = False

    def __init__(self, ls: LossSettings) -> None:
        self.ls = ls

    def projector_spec(self) -> dict[str, bool]:
        return {"t2s": False, "s2t": False}

    def losses(self, s: Tensor, h_s: Tensor, targets: Tensor, tb: TeacherBatch | None, head: TeacherHead | None,
               projectors: nn.ModuleDict, student_head: Tensor, vocab: int) -> dict[str, Tensor]:
        ce = token_ce(s[:, :vocab], targets).sum()
        return {"objective": ce, "ce": ce.detach()}


class SeqKD(Method):
    name = "seqkd"


class VanillaKD(Method):
    name = "kd"
    needs_teacher = True

    def losses(self, s, h_s, targets, tb, head, projectors, student_head, vocab):  # type: ignore[override]
        r = self.ls.kd_rate
        ce = token_ce(s[:, :vocab], targets).sum()
        kd = self.ls.dist(s[:, :vocab], head.logits(tb)[:, :vocab]).sum()
        return {"objective": (1 - r) * ce + r * kd, "ce": ce.detach(), "kd": kd.detach()}


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

    def projector_spec(self) -> dict[str, bool]:
        return {"t2s": self.ls.student_space, "s2t": self.ls.teacher_space}

    def losses(self, s, h_s, targets, tb, head, projectors, student_head, vocab):  # type: ignore[override]
        r = self.ls.kd_rate
        s = s[:, :vocab]
        ce = token_ce(s, targets).sum()
        t_logits = head.logits(tb)[:, :vocab]
        terms = dskd_terms(s, h_s, targets, t_logits, tb.hidden, tb.argmax,
                           projectors["t2s"] if "t2s" in projectors else None,
                           projectors["s2t"] if "s2t" in projectors else None,
                           student_head[:vocab], _sliced(head, vocab), self.ls)
        kd = terms.pop("kd")
        return {"objective": (1 - r) * ce + r * kd, "ce": ce.detach(), "kd": kd.detach(), **terms}


def _sliced(head: TeacherHead, vocab: int) -> TeacherHead:
    if head.weight.shape[0] == vocab:
        return head
    return TeacherHead(head.weight[:vocab], head.bias[:vocab] if head.bias is not None else None, head.logits_source)


METHOD_CLASSES: dict[str, type[Method]] = {"sft": Method, "seqkd": SeqKD, "kd": VanillaKD, "dskd": DSKD}


def make_method(name: str, ls: LossSettings) -> Method:
    return METHOD_CLASSES[name](ls)


def method_info(m: Method) -> dict[str, Any]:
    return {"name": m.name, **m.ls.__dict__}

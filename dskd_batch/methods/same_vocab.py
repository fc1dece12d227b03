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

With ``kd_positions = "teacher-correct"`` (kd, dskd), the teacher's distribution is trusted only
where its top-1 token is the target: elsewhere the KD terms of that position are replaced by the
student's CE on the target (the teacher's distribution replaced by the one-hot label), so a
position the teacher gets wrong is trained on the label alone, at full weight.

Cross-vocabulary methods (the student has another tokenizer; the teacher batch holds the M
teacher response positions of the same examples and a :class:`CrossBatch` says how they align,
from the cache's alignment sidecar, see :mod:`dskd_batch.cache.align`). CE is always on the student's
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
- ``gold``: TRL's GOLD at the ETA pairs: forward KL over the tokens both vocabularies share
  (one-to-one by bytes) plus ULD's sorted L1 over the rest, weighted by the shared share of the
  teacher's vocabulary.
- ``alm``: approximate likelihood matching: per aligned chunk, the binarised KL between the
  teacher's and the student's likelihoods of the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..losses import distance, fkl, masked_sum, token_ce
from ..cache.records import TeacherBatch  # noqa: F401 - part of this module's interface (methods read the record)
from ..cache.head import TeacherHead  # noqa: F401 - part of this module's interface (methods read the head)

if TYPE_CHECKING:
    from .cross_vocab import CrossBatch

Tensor = torch.Tensor
KD_GRAD = "_kd"  # the KD sum with its graph (on-policy steps combine it with CE from another batch); not logged


@dataclass(frozen=True)
class LossSettings:
    distance: str = "fkl"
    temperature: float = 2.0
    kd_rate: float = 0.5
    agreement_mask: bool = False
    kd_positions: str = "all"  # or "teacher-correct" (see the module docstring)
    student_space: bool = True
    teacher_space: bool = True
    distance_args: tuple[tuple[str, Any], ...] = ()  # the distance's own hyper-parameters (losses.DISTANCES)
    alm_tau: float = 100.0  # ALM's binarisation temperature

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
    teacher_correct = False  # supports kd_positions = "teacher-correct" (its KD reads the teacher's argmax)
    per_position = True  # the loss is a sum of terms of single positions (so it can be computed in chunks)
    logit_sets = 1  # [positions, vocabulary] logit tensors its loss builds (--loss-chunk -1 sizes chunks by it)

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

    def teacher_keep(self, targets: Tensor, t_argmax: Tensor) -> Tensor | None:
        """Positions whose KD terms are kept: those where the teacher's top-1 is the target under
        ``kd_positions = "teacher-correct"``, else None (all)."""
        return t_argmax == targets if self.ls.kd_positions == "teacher-correct" else None


def kd_or_label(kd: Tensor, ce: Tensor, keep: Tensor | None) -> Tensor:
    """Sum of the per-position KD where ``keep`` (all when None), and of the CE on the target elsewhere."""
    return kd.sum() if keep is None else masked_sum(kd, keep) + masked_sum(ce, ~keep)


class SeqKD(Method):
    name = "seqkd"
    needs_generation = True


class VanillaKD(Method):
    name = "kd"
    needs_teacher = True
    logit_sets = 2  # the student's and the teacher's
    teacher_correct = True

    def losses(self, x: LossInputs) -> dict[str, Tensor]:
        s = x.s[:, :x.vocab]
        ce = token_ce(s, x.targets)
        keep = self.teacher_keep(x.targets, x.teacher.argmax)
        kd = kd_or_label(self.ls.dist(s, x.head.logits(x.teacher)[:, :x.vocab]), ce, keep)
        return self.combine(ce.sum(), {"kd": kd, **_kept(keep)})


def _kept(keep: Tensor | None) -> dict[str, Tensor]:
    """The logged count of positions whose KD terms were kept (teacher-correct positions)."""
    return {} if keep is None else {"kd_kept": keep.sum().float()}


def dskd_terms(s: Tensor, h_s: Tensor, targets: Tensor, t_logits: Tensor, h_t: Tensor, t_argmax: Tensor,
               t2s: nn.Module | None, s2t: nn.Module | None, student_head: Tensor, head: TeacherHead,
               ls: LossSettings, keep: Tensor | None = None,
               t2s_view: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """The DSKD terms as sums over positions (see the module docstring); with ``keep``, the two KD
    terms only at those positions; ``t2s_view`` maps the t2s logits before they are used (across
    tokenizers: the space swap at dummy-prefix pairs, :func:`dskd_batch.methods.cross_vocab.swap_columns`)."""
    keep = torch.ones_like(targets, dtype=torch.bool) if keep is None else keep
    out: dict[str, Tensor] = {}
    zero = s.new_zeros((), dtype=torch.float32)
    kd = zero
    if t2s is not None:
        t2s_logits = t2s(h_t.to(s.dtype)).float() @ student_head.detach().float().T
        if t2s_view is not None:
            t2s_logits = t2s_view(t2s_logits)
        t2s_ce = token_ce(t2s_logits, targets).sum()
        pred = t2s_logits.argmax(-1)
        t2s_kd = masked_sum(ls.dist(s, t2s_logits.detach()), keep & (pred == t_argmax) if ls.agreement_mask else keep)
        kd = kd + t2s_ce + t2s_kd
        out.update(t2s_ce=t2s_ce.detach(), t2s_kd=t2s_kd.detach(),
                   t2s_acc=(pred == targets).sum().float(), t2s_agree=(pred == t_argmax).sum().float())
    if s2t is not None:
        s2t_logits = head.project(s2t(h_s))
        s2t_kd = masked_sum(fkl(s2t_logits, t_logits, temperature=ls.temperature), keep)
        kd = kd + s2t_kd
        out.update(s2t_kd=s2t_kd.detach(), s2t_acc=(s2t_logits.argmax(-1) == targets).sum().float())
    out["kd"] = kd
    return out


class DSKD(Method):
    name = "dskd"
    needs_teacher = True
    needs_hidden = True
    dual_space = True
    logit_sets = 4  # the student's, the teacher's, and both projections to full vocabularies
    teacher_correct = True

    def projector_spec(self) -> dict[str, bool]:
        return {"t2s": self.ls.student_space, "s2t": self.ls.teacher_space}

    def losses(self, x: LossInputs) -> dict[str, Tensor]:
        x = x.sliced()
        ce = token_ce(x.s, x.targets)
        t_logits = x.head.logits(x.teacher)[:, :x.vocab]
        keep = self.teacher_keep(x.targets, x.teacher.argmax)
        terms = dskd_terms(x.s, x.h_s, x.targets, t_logits, x.teacher.hidden, x.teacher.argmax, x.projector("t2s"),
                           x.projector("s2t"), x.student_head, _sliced(x.head, x.vocab), self.ls, keep)
        if keep is not None:  # the label where the teacher is wrong
            terms["kd"] = terms["kd"] + masked_sum(ce, ~keep)
        return self.combine(ce.sum(), {**terms, **_kept(keep)})


def _sliced(head: TeacherHead, vocab: int) -> TeacherHead:
    if head.weight.shape[0] == vocab:
        return head
    return TeacherHead(head.weight[:vocab], head.bias[:vocab] if head.bias is not None else None, head.logits_source)

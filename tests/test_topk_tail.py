"""A top-k-only cache's tail: shaped like the student's, the KL at T = 1 is the exact KL over the
top-k tokens plus one "any other token" bucket; without a student it is the flat tail."""

from __future__ import annotations

import torch

from dskd_batch.losses import fkl
from dskd_batch.records import TeacherBatch
from dskd_batch.teacher import TeacherHead


def _topk_record(teacher: torch.Tensor, k: int) -> TeacherBatch:
    tv, ti = teacher.topk(k, dim=-1)
    return TeacherBatch(logsumexp=torch.logsumexp(teacher, -1), topk_values=tv, topk_indices=ti,
                        argmax=ti[:, 0])


def _head(v: int) -> TeacherHead:
    return TeacherHead(torch.zeros(v, 4), None, "topk")


def _bucket_kl(teacher: torch.Tensor, student: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """KL(p || q) between the distributions over (each top-k token, everything else), computed
    from the full teacher distribution: an independent reference."""
    p, q = torch.softmax(teacher.double(), -1), torch.softmax(student.double(), -1)
    pk, qk = p.gather(-1, idx), q.gather(-1, idx)
    pb = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    qb = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    return (pb * (pb.log() - qb.log())).sum(-1)


def test_student_shaped_tail_gives_the_exact_bucket_kl() -> None:
    torch.manual_seed(0)
    n, v, k = 6, 300, 16
    teacher = torch.randn(n, v) * 3
    student = torch.randn(n, v) * 2
    tb = _topk_record(teacher, k)
    t = _head(v).logits(tb, tail_like=student)
    p = torch.softmax(t.double(), -1)
    # the top-k probabilities and the tail mass are the teacher's own
    torch.testing.assert_close(p.gather(-1, tb.topk_indices), torch.softmax(teacher.double(), -1).gather(-1, tb.topk_indices),
                               atol=1e-6, rtol=1e-5)
    # inside the tail the target is proportional to the student
    tail = torch.ones(n, v, dtype=torch.bool).scatter_(-1, tb.topk_indices, False)
    ratio = (p / torch.softmax(student.double(), -1))[tail].view(n, -1)
    torch.testing.assert_close(ratio.min(-1).values, ratio.max(-1).values)
    kl = fkl(student, t, temperature=1.0).double()
    torch.testing.assert_close(kl, _bucket_kl(teacher, student, tb.topk_indices), atol=1e-5, rtol=1e-4)
    # a lower bound of the full KL (data processing), strictly below it here
    assert (kl < fkl(student, teacher, temperature=1.0).double()).all()


def test_student_shaped_tail_supervises_only_the_tail_mass() -> None:
    """The gradient inside the tail is proportional to the student's tail probabilities: the
    loss moves the tail's total mass and leaves its shape to the student."""
    torch.manual_seed(1)
    n, v, k = 4, 200, 8
    teacher = torch.randn(n, v) * 3
    student = (torch.randn(n, v) * 2).requires_grad_()
    tb = _topk_record(teacher, k)
    fkl(student, _head(v).logits(tb, tail_like=student), temperature=1.0).sum().backward()
    tail = torch.ones(n, v, dtype=torch.bool).scatter_(-1, tb.topk_indices, False)
    ratio = (student.grad / torch.softmax(student.detach(), -1))[tail].view(n, -1)
    torch.testing.assert_close(ratio.min(-1).values, ratio.max(-1).values, atol=1e-5, rtol=1e-4)
    # the flat tail, by contrast, pulls the tail towards uniform
    student.grad = None
    fkl(student, _head(v).logits(tb), temperature=1.0).sum().backward()
    ratio = (student.grad / torch.softmax(student.detach(), -1))[tail].view(n, -1)
    assert ((ratio.max(-1).values - ratio.min(-1).values) > 1e-2).all()


def test_flat_tail_without_a_student_and_edge_cases() -> None:
    torch.manual_seed(2)
    n, v, k = 3, 50, 5
    teacher = torch.randn(n, v) * 3
    tb = _topk_record(teacher, k)
    t = _head(v).logits(tb)
    tail = torch.ones(n, v, dtype=torch.bool).scatter_(-1, tb.topk_indices, False)
    vals = t[tail].view(n, -1)
    torch.testing.assert_close(vals.min(-1).values, vals.max(-1).values)  # flat
    torch.testing.assert_close(torch.logsumexp(t, -1), tb.logsumexp)
    # a student with fewer rows than the teacher's head: the rows it lacks get no tail mass
    narrow = _head(v).logits(tb, tail_like=torch.randn(n, v - 10))
    assert torch.isneginf(narrow[:, v - 10:][tail[:, v - 10:]]).all()
    torch.testing.assert_close(torch.logsumexp(narrow, -1), tb.logsumexp)
    # top-k over the whole vocabulary: no tail, no NaN
    full = _topk_record(teacher, v)
    out = _head(v).logits(full, tail_like=torch.randn(n, v))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(torch.softmax(out, -1), torch.softmax(teacher, -1))

"""A top-k-only cache's full distribution: the exact top-k probabilities, the exact tail mass
spread flat over the rest, and no NaN when the top-k is the whole vocabulary."""

from __future__ import annotations

import torch

from dskd_batch.cache.records import TeacherBatch
from dskd_batch.cache.head import TeacherHead


def _topk_record(teacher: torch.Tensor, k: int) -> TeacherBatch:
    tv, ti = teacher.topk(k, dim=-1)
    return TeacherBatch(logsumexp=torch.logsumexp(teacher, -1), topk_values=tv, topk_indices=ti,
                        argmax=ti[:, 0])


def test_topk_source_is_exact_on_the_topk_with_a_flat_tail() -> None:
    torch.manual_seed(2)
    n, v, k = 3, 50, 5
    teacher = torch.randn(n, v) * 3
    tb = _topk_record(teacher, k)
    head = TeacherHead(torch.zeros(v, 4), None, "topk")
    t = head.logits(tb)
    p, exact = torch.softmax(t.double(), -1), torch.softmax(teacher.double(), -1)
    torch.testing.assert_close(p.gather(-1, tb.topk_indices), exact.gather(-1, tb.topk_indices), atol=1e-6, rtol=1e-5)
    tail = torch.ones(n, v, dtype=torch.bool).scatter_(-1, tb.topk_indices, False)
    vals = t[tail].view(n, -1)
    torch.testing.assert_close(vals.min(-1).values, vals.max(-1).values)  # flat
    torch.testing.assert_close(torch.logsumexp(t, -1), tb.logsumexp)  # so the tail mass is exact
    # top-k over the whole vocabulary: no tail, no NaN, the teacher's own distribution
    out = head.logits(_topk_record(teacher, v))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(torch.softmax(out, -1), torch.softmax(teacher, -1))

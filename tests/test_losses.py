"""Each distance against an independent naive implementation (values and gradients), with
temperature; identical distributions give 0; all-masked gives 0."""

from __future__ import annotations

import math

import pytest
import torch

from dskd_batch.losses import DISTANCES, masked_sum, token_ce


def naive(name: str, s: torch.Tensor, t: torch.Tensor, T: float, lam: float = 0.1, alpha: float = 0.5) -> torch.Tensor:
    """Plain probabilities in float64, one row at a time, written from the formulas."""
    out = []
    for srow, trow in zip(s.double(), t.double()):
        q = torch.exp(srow / T) / torch.exp(srow / T).sum()
        p = torch.exp(trow / T) / torch.exp(trow / T).sum()

        def kl(a, b):
            return (a * torch.log(a / b)).sum()

        if name == "fkl":
            v = kl(p, q)
        elif name == "rkl":
            v = kl(q, p)
        elif name == "js":
            m = (p + q) / 2
            v = 0.5 * kl(p, m) + 0.5 * kl(q, m)
        elif name == "skl":
            v = kl(p, lam * p + (1 - lam) * q)
        elif name == "srkl":
            v = kl(q, lam * q + (1 - lam) * p)
        else:  # akl
            ps = sorted(range(len(p)), key=lambda i: float(p[i]))
            cum, tail = 0.0, set()
            for i in ps:
                cum += float(p[i])
                if cum < alpha:
                    tail.add(i)
            gh = sum(abs(float(p[i] - q[i])) for i in range(len(p)) if i not in tail)
            gt = sum(abs(float(p[i] - q[i])) for i in tail)
            v = gh / (gh + gt) * kl(p, q) + gt / (gh + gt) * kl(q, p)
        out.append(v)
    return torch.stack(out)


@pytest.mark.parametrize("name", sorted(DISTANCES))
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_distance_matches_naive(name: str, T: float) -> None:
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(6, 11, generator=g) * 2).requires_grad_()
    t = (torch.randn(6, 11, generator=g) * 2).requires_grad_()
    ours = DISTANCES[name](s, t, temperature=T, skew_lambda=0.1, akl_alpha=0.5)
    s2, t2 = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    ref = naive(name, s2, t2, T)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(s.grad.double(), s2.grad.double(), atol=1e-5, rtol=1e-4)
    if name != "akl":  # AKL's weights carry no gradient, the naive version's python floats neither
        torch.testing.assert_close(t.grad.double(), t2.grad.double(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(DISTANCES))
def test_identical_distributions_give_zero(name: str) -> None:
    x = torch.randn(5, 13)
    assert DISTANCES[name](x, x.clone(), temperature=2.0).abs().max() < 1e-6


def test_masks_and_ce() -> None:
    per = torch.tensor([1.0, 2.0, float("nan"), 4.0])
    assert masked_sum(per, torch.tensor([True, False, False, True])) == 5.0
    assert masked_sum(per, torch.zeros(4, dtype=torch.bool)) == 0.0
    logits = torch.tensor([[0.0, math.log(3.0)]])
    torch.testing.assert_close(token_ce(logits, torch.tensor([1])), torch.tensor([-math.log(0.75)]))


def test_akl_head_found_by_top_k_matches_a_full_sort() -> None:
    """AKL finds its head with a growing top-k (rows whose head is longer than k are redone with 4k);
    on a large vocabulary, with peaked rows and rows whose head is longer than 64 and 256 tokens, it
    equals the formula computed with a full sort in float64."""
    g = torch.Generator().manual_seed(3)
    V = 3000
    t = torch.randn(9, V, generator=g) * 2
    t[:3, :2] += 25  # peaked: a head of one or two tokens
    t[3:6] *= 0.05  # nearly flat: a head of about half the vocabulary
    t[6:, :100] += 5  # 100 likely tokens: a head longer than 64
    s = torch.randn(9, V, generator=g) * 2
    lp, lq = torch.log_softmax(t.double() / 2, -1), torch.log_softmax(s.double() / 2, -1)
    p, q = lp.exp(), lq.exp()
    p_sorted, order = p.sort(-1)
    gap = (p_sorted - q.gather(-1, order)).abs()
    tail = p_sorted.cumsum(-1) < 0.5
    gh, gt = (gap * ~tail).sum(-1), (gap * tail).sum(-1)
    ref = (gh * (p * (lp - lq)).sum(-1) + gt * (q * (lq - lp)).sum(-1)) / (gh + gt)
    heads = (~tail).sum(-1)
    assert heads[:3].max() <= 2 and heads[3:6].min() > 256 and heads[6:].min() > 64
    torch.testing.assert_close(DISTANCES["akl"](s, t, temperature=2.0).double(), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(DISTANCES))
def test_minus_inf_logits_count_as_absent_tokens(name: str) -> None:
    """Tokens both models give -inf (a padded vocabulary's rows) change no distance."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 20, generator=g), torch.randn(4, 20, generator=g)
    pad = torch.full((4, 5), float("-inf"))
    f = DISTANCES[name]
    torch.testing.assert_close(f(torch.cat([s, pad], -1), torch.cat([t, pad], -1), temperature=2.0),
                               f(s, t, temperature=2.0))

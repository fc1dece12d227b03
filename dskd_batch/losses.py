"""Distances between teacher and student token distributions, as pure functions.

Every function takes student logits ``s`` and teacher logits ``t`` of shape [N, V] (N positions,
already gathered to the response positions that count) and a temperature, and returns the
**per-position** loss [N] in fp32. Callers mask and *sum*; normalising by the number of response
tokens of the whole optimizer step is the training loop's job, so a loss never depends on how a
batch was split into micro-batches.

p = softmax(t / T) (teacher), q = softmax(s / T) (student); softmax in fp32:

- ``fkl``  = sum p (log p - log q)
- ``rkl``  = sum q (log q - log p)
- ``js``   = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2
- ``skl``  = KL(p || lam p + (1 - lam) q)              (Ko et al., 2024)
- ``srkl`` = KL(q || lam q + (1 - lam) p)
- ``akl``  = (g_head FKL + g_tail RKL) / (g_head + g_tail) (Wu et al., 2024): sort p, the tail is
  the least likely tokens whose cumulative mass stays below alpha, g = sum |p - q| over each part,
  without gradient.

No T^2 factor is applied (the DSKD papers use none); gradients flow into whichever inputs require
them, so detaching a teacher (e.g. DSKD's projected teacher) is the caller's choice.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _logp(x: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(x.float() / temperature, dim=-1)


def _kl(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """KL(a || b) per row from log-probabilities; 0 * log 0 counts as 0."""
    pa = logp_a.exp()
    return torch.where(pa > 0, pa * (logp_a - logp_b), torch.zeros_like(pa)).sum(-1)


def fkl(s: Tensor, t: Tensor, temperature: float = 1.0, **_: float) -> Tensor:
    return _kl(_logp(t, temperature), _logp(s, temperature))


def rkl(s: Tensor, t: Tensor, temperature: float = 1.0, **_: float) -> Tensor:
    return _kl(_logp(s, temperature), _logp(t, temperature))


def _log_mix(logp_a: Tensor, logp_b: Tensor, lam: float) -> Tensor:
    """log(lam * a + (1 - lam) * b), computed stably from log-probabilities."""
    return torch.logaddexp(logp_a + torch.log(torch.tensor(lam)), logp_b + torch.log(torch.tensor(1.0 - lam)))


def js(s: Tensor, t: Tensor, temperature: float = 1.0, **_: float) -> Tensor:
    lp, lq = _logp(t, temperature), _logp(s, temperature)
    lm = _log_mix(lp, lq, 0.5)
    return 0.5 * _kl(lp, lm) + 0.5 * _kl(lq, lm)


def skl(s: Tensor, t: Tensor, temperature: float = 1.0, skew_lambda: float = 0.1, **_: float) -> Tensor:
    lp, lq = _logp(t, temperature), _logp(s, temperature)
    return _kl(lp, _log_mix(lp, lq, skew_lambda))


def srkl(s: Tensor, t: Tensor, temperature: float = 1.0, skew_lambda: float = 0.1, **_: float) -> Tensor:
    lp, lq = _logp(t, temperature), _logp(s, temperature)
    return _kl(lq, _log_mix(lq, lp, skew_lambda))


def akl(s: Tensor, t: Tensor, temperature: float = 1.0, akl_alpha: float = 0.5, **_: float) -> Tensor:
    lp, lq = _logp(t, temperature), _logp(s, temperature)
    p, q = lp.exp(), lq.exp()
    p_sorted, order = p.sort(dim=-1)  # ascending: the tail comes first
    gap = (p_sorted - q.gather(-1, order)).abs().detach()
    tail = (p_sorted.cumsum(-1) < akl_alpha).float()
    g_tail = (gap * tail).sum(-1)
    g_head = (gap * (1 - tail)).sum(-1)
    denom = (g_head + g_tail).clamp_min(1e-12)
    return (g_head / denom) * _kl(lp, lq) + (g_tail / denom) * _kl(lq, lp)


DISTANCES: dict[str, Callable[..., Tensor]] = {"fkl": fkl, "rkl": rkl, "js": js, "skl": skl, "srkl": srkl, "akl": akl}


def distance(name: str) -> Callable[..., Tensor]:
    try:
        return DISTANCES[name]
    except KeyError:
        raise ValueError(f"unknown distance {name!r}; choose from {', '.join(DISTANCES)}") from None


def token_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-position cross-entropy [N] of raw logits [N, V] (fp32) on target ids [N]."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def masked_sum(per_token: Tensor, mask: Tensor) -> Tensor:
    """Sum of a per-position loss over positions where ``mask`` is true (0 when all are masked)."""
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum()

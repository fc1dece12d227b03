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
- ``akl``  = (g_head FKL + g_tail RKL) / (g_head + g_tail) (Wu et al., 2024): the tail is the least
  likely tokens (p ascending) whose cumulative mass stays below alpha, g = sum |p - q| over each
  part, without gradient.

No T^2 factor is applied (the DSKD papers use none); gradients flow into whichever inputs require
them, so detaching a teacher (e.g. DSKD's projected teacher) is the caller's choice.

``DISTANCES`` (name -> function) is the one registry. A distance is a function
``f(s, t, temperature=1.0, **hyper)`` whose other keyword parameters, with their defaults, are its
hyper-parameters: ``distill --distance NAME --distance-arg KEY=VALUE`` (and a pipeline's
``distance_arg``) set them, checked against the signature and the optional ``f.bounds``
(key -> open interval). Installed packages add distances through the ``dskd_batch.distances``
entry-point group (name -> function); nothing else needs an edit.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

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
    with torch.no_grad():
        gap = (p - q).abs()
        g_all = gap.sum(-1)
        g_head = _head_sum(p, gap, akl_alpha)
        denom = g_all.clamp_min(1e-12)
        w_head, w_tail = g_head / denom, (g_all - g_head) / denom
    diff = lp - lq  # FKL and RKL from one difference: sum p (lp - lq), -sum q (lp - lq)
    f, r = p * diff, q * diff
    if not bool(torch.isfinite(diff).all()):  # a -inf logit: 0 log 0 counts as 0
        f, r = torch.where(p > 0, f, 0.0), torch.where(q > 0, r, 0.0)
    return w_head * f.sum(-1) - w_tail * r.sum(-1)


def _head_sum(p: Tensor, gap: Tensor, alpha: float) -> Tensor:
    """Sum of ``gap`` over AKL's head: the tokens outside the tail, where the tail is the least likely
    tokens whose cumulative mass (ascending) stays below ``alpha``. A token is in the head when the
    mass of the tokens ranked above it is at most ``total - alpha``, so the head is a prefix of the
    descending order: found with top-k, k grown (for the rows that need it) until a row's head ends
    inside it. A peaked distribution's head is a few tokens (the tuned demo teacher's: about 1 on
    average at T = 1, 9-20 at T = 2), and a full sort of a large vocabulary costs more than the rest
    of AKL (benchmarks/bench_distances.py)."""
    lead, vocab = p.shape[:-1], p.shape[-1]
    p, gap = p.reshape(-1, vocab), gap.reshape(-1, vocab)
    k = min(vocab, 64)
    out, longer = _head_in_top_k(p, gap, alpha, k)
    rows = torch.nonzero(longer).flatten()
    while rows.numel():  # heads longer than k: those rows again with 4k
        k = min(vocab, 4 * k)
        out[rows], longer = _head_in_top_k(p[rows], gap[rows], alpha, k)
        rows = rows[longer]
    return out.reshape(lead)


def _head_in_top_k(p: Tensor, gap: Tensor, alpha: float, k: int) -> tuple[Tensor, Tensor]:
    """Over each row's top ``k`` of ``p``: the sum of ``gap`` over the head's tokens among them, and
    whether the head may go on past them (its k-th token is in the head and k is not the vocabulary)."""
    vals, idx = p.topk(k, dim=-1)
    head = (vals.cumsum(-1) - vals) <= p.sum(-1, keepdim=True) - alpha  # mass ranked above each token
    return (gap.gather(-1, idx) * head).sum(-1), head[:, -1] & (k < p.shape[-1])


skl.bounds = srkl.bounds = {"skew_lambda": (0.0, 1.0)}  # type: ignore[attr-defined]
akl.bounds = {"akl_alpha": (0.0, 1.0)}  # type: ignore[attr-defined]

DISTANCES: dict[str, Callable[..., Tensor]] = {"fkl": fkl, "rkl": rkl, "js": js, "skl": skl, "srkl": srkl, "akl": akl}


_LOADED: set[str] = set()


def with_plugins(group: str, registry: dict[str, Any]) -> dict[str, Any]:
    """``registry`` with the entry points of ``group`` (installed packages) added, loaded on first
    use (a plug-in imports dskd_batch itself, so not at import time); built-ins win a clash."""
    if group not in _LOADED:
        _LOADED.add(group)
        from importlib.metadata import entry_points

        for ep in entry_points(group=group):
            if ep.name not in registry:
                registry[ep.name] = ep.load()
    return registry


def distances() -> dict[str, Callable[..., Tensor]]:
    """The distance registry, installed plug-ins (entry points ``dskd_batch.distances``) included."""
    return with_plugins("dskd_batch.distances", DISTANCES)


def distance(name: str) -> Callable[..., Tensor]:
    try:
        return distances()[name]
    except KeyError:
        raise ValueError(f"unknown distance {name!r}; choose from {', '.join(DISTANCES)}") from None


def distance_params(name: str) -> dict[str, Any]:
    """The hyper-parameters of a distance and their defaults: its keyword parameters besides
    ``temperature``."""
    sig = inspect.signature(distance(name))
    return {p.name: p.default for p in list(sig.parameters.values())[2:]
            if p.name != "temperature" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.default is not inspect.Parameter.empty}


def parse_distance_args(name: str, items: tuple[str, ...] | dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """``KEY=VALUE`` strings (or a mapping) -> (problems, values), checked against the distance's
    signature (type of the default) and its ``bounds``."""
    params = distance_params(name)
    bounds = getattr(distance(name), "bounds", {})
    pairs = list(items.items()) if isinstance(items, dict) else [tuple(x.split("=", 1)) if "=" in x else (x, None)
                                                                for x in items]
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, raw in pairs:
        key = str(key).strip().replace("-", "_")
        if key not in params:
            known = ", ".join(f"{k} (default {v})" for k, v in params.items()) or "none"
            problems.append(f"distance {name} has no hyper-parameter {key!r} (it takes: {known})")
            continue
        if raw is None:
            problems.append(f"--distance-arg {key} needs a value: {key}=VALUE")
            continue
        kind = type(params[key]) if params[key] is not None else float
        try:
            value = kind(raw) if not isinstance(raw, bool) else raw
        except (TypeError, ValueError):
            problems.append(f"{name} {key} must be a {kind.__name__}, got {raw!r}")
            continue
        if key in bounds and not bounds[key][0] < value < bounds[key][1]:
            problems.append(f"{name} {key} must be in ({bounds[key][0]:g}, {bounds[key][1]:g}), got {value}")
            continue
        values[key] = value
    return problems, values


def token_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-position cross-entropy [N] of raw logits [N, V] (fp32) on target ids [N]."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def masked_sum(per_token: Tensor, mask: Tensor) -> Tensor:
    """Sum of a per-position loss over positions where ``mask`` is true (0 when all are masked)."""
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum()

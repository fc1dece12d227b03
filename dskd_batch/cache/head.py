"""The teacher's head and the one rule that turns a teacher record into full-vocabulary logits.

The cache stores the input of the teacher's LM head (``hidden``), its top-k logits and their
log-sum-exp; :class:`TeacherHead` (W_T, its bias and the teacher's embeddings, stored once per cache)
rebuilds the logits from them: exactly as ``hidden @ W_T.T (+ b)`` where stage one checked that this
reproduces the model's real logits (:func:`reconstruction_check`, :func:`kl_stats`), or as the exact
top-k plus a tail rebuilt from a lossy hidden state (:func:`assemble_logits`). Stage two's methods and
the cache reader both use it; stage one uses the checks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

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
        return reconstruct_logits(h, self.weight, self.bias)

    @torch.no_grad()
    def logits(self, tb: Any) -> Tensor:
        """Full-vocabulary teacher logits [m, V] of a teacher record or batch (anything with the
        fields of :data:`dskd_batch.cache.records.TEACHER_FIELDS` as attributes), from the best source
        the cache has: the real logits if given, ``hidden`` (h @ W.T), ``assembled`` (exact top-k +
        a tail rebuilt from a lossy hidden state) or ``topk`` (exact top-k, flat tail). The one
        place this rule lives."""
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


def reconstruct_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden @ weight.T (+ bias)`` as fp32: the full teacher logits rebuilt from the cache. Under
    bf16 autocast (``--precision bf16``) the matmul runs in bf16, as a fused linear + loss kernel's
    does, and the logits come back as fp32 for the log-softmax."""
    logits = (hidden.float() @ weight.float().T).float()
    if bias is not None:
        logits = logits + bias.float()
    return logits


def kl_stats(real: torch.Tensor, approx: torch.Tensor, temperature: float, resolution: float | None = None
             ) -> dict[str, float]:
    """KL(softmax(real/T) || softmax(approx/T)) per row: mean and max; and top-1 agreement. With
    ``resolution`` (the relative precision of the dtype ``real`` was computed in), also
    ``top1_within_rounding``: the share of rows where approx's argmax is a token whose real logit
    is the real maximum up to that rounding. In bf16 (8 significant bits) logits near 30 come in
    steps of 0.125, so ties, and argmaxes that differ only by which tied token comes first, are
    common; they say nothing about whether ``approx`` is the same function."""
    from ..losses import fkl

    kl = fkl(approx, real, temperature=temperature).clamp_min(0)
    out = {
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float((real.argmax(-1) == approx.argmax(-1)).float().mean()),
    }
    if resolution is not None:
        top = real.max(-1).values
        picked = real.gather(-1, approx.argmax(-1, keepdim=True)).squeeze(-1)
        out["top1_within_rounding"] = float((picked >= top - 2 * resolution * top.abs().clamp_min(1.0)).float().mean())
    return out


def head_reproduces_logits(exact_t1: dict[str, float], teacher_dtype: str) -> bool:
    """The one rule for "h @ W.T (+ b) is the teacher's logits", used by stage one (whether the cache's
    hidden states give exact logits) and the live stage (whether the real logits must be passed on):
    on the positions checked (``exact_t1`` of :func:`reconstruction_check`), the mean KL at T = 1 is
    within the teacher's own rounding (1e-4 in fp32, 1e-3 in a 16-bit dtype) and the top-1 token is the
    same, up to that rounding, at 99% of them or more."""
    if not exact_t1:
        return False
    tol = 1e-4 if teacher_dtype == "fp32" else 1e-3
    # caches written before the rounding-aware agreement was measured have only the plain one
    top1 = exact_t1.get("top1_within_rounding", exact_t1.get("top1_agreement", 0.0))
    return exact_t1.get("kl_mean", 1.0) <= tol and top1 >= 0.99


def reconstruction_check(logits: torch.Tensor, hidden: torch.Tensor, stored_hidden: torch.Tensor | None,
                         weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32
                         ) -> dict[str, Any]:
    """Compare real logits with logits rebuilt from the exact and from the stored hidden state.

    ``exact`` measures whether the architecture's logits are a plain linear head of its hidden
    state (false with soft-capping, logit scaling, or a head we cannot see); ``stored`` measures
    what the storage mode (fp16, compact, ...) adds on top. ``dtype``: what the teacher computed
    its logits in (their rounding, for ``exact_t1.top1_within_rounding``).
    """
    rec = reconstruct_logits(hidden, weight, bias)
    scale = float(logits.abs().max().clamp_min(1e-6))
    res: dict[str, Any] = {
        "tokens": int(logits.shape[0]),
        "exact_max_abs_err": float((rec - logits).abs().max()),
        "exact_rel_err": float((rec - logits).abs().max()) / scale,
        "exact_t1": kl_stats(logits, rec, 1.0, resolution=torch.finfo(dtype).eps),
    }
    if stored_hidden is not None:
        srec = reconstruct_logits(stored_hidden, weight, bias)
        res["stored_t1"] = kl_stats(logits, srec, 1.0)
        res["stored_t2"] = kl_stats(logits, srec, 2.0)
    return res


def assemble_logits(approx: torch.Tensor, topk_values: torch.Tensor, topk_indices: torch.Tensor,
                    logsumexp: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from exact top-k values + log-sum-exp and an approximate tail.

    The top-k entries are the teacher's own values; the tail keeps the shape of ``approx`` (e.g.
    logits rebuilt from a lossy hidden state), is capped below the k-th value, and is shifted so
    that its probability mass is exactly ``1 - sum(top-k probabilities)``, which the stored
    log-sum-exp makes known. The result's log-sum-exp equals the stored one, so probabilities at
    temperature 1 are exact on the top-k and the tail mass is exact.

    For a top-k-only cache (``approx`` all zeros) the tail is flat. A tail shaped like the
    student's own (so that the KL at T = 1 is the exact KL over the top-k plus one bucket) was
    tried and trained worse than the flat one at T = 2 (docs/results/benchmarks.md: "What the bytes buy in
    training").
    """
    tv = topk_values.float()
    lse = logsumexp.float().unsqueeze(-1)
    top_mass = torch.exp(tv - lse).sum(-1, keepdim=True).clamp(max=1.0)
    tail_mass = (1.0 - top_mass).clamp_min(1e-30)
    tail = approx.float().clone()
    tail.scatter_(-1, topk_indices.long(), float("-inf"))
    tail = torch.minimum(tail, tv[..., -1:])
    shift = torch.log(tail_mass) + lse - torch.logsumexp(tail, dim=-1, keepdim=True)
    out = tail + shift
    out.scatter_(-1, topk_indices.long(), tv)
    return out

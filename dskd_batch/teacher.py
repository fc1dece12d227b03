"""The one teacher-forward function, shared by stage one (caching) and the live teacher stage.

It runs the model once on a right-padded batch and returns, per example and per position i
(what the teacher emitted after reading ``input_ids[: i + 1]``):

- ``hidden``: the input of the LM head (after the final norm), fp32 [n, d]
- ``topk_values`` / ``topk_indices``: top-k of the real logits [n, k]
- ``logsumexp``: log-sum-exp of the full real logits [n]
- ``argmax``: the teacher's top-1 token [n]

The head input is captured with a forward hook on the model's own output head, so whatever the
architecture does before its head (final norm, scaling) is included, and the logits are the
model's real logits, soft-capping or bias included. Whether ``hidden @ W.T (+ b)`` reproduces
them is then checked, not assumed (see :func:`reconstruction_check`).
"""

from __future__ import annotations

from typing import Any

import torch

Record = dict[str, Any]


class TeacherForward:
    """Callable wrapper around a causal LM that yields cache records for a batch of sequences."""

    def __init__(self, model: Any, top_k: int, pad_id: int, vocab: int | None = None) -> None:
        self.model = model
        self.top_k = top_k
        self.pad_id = pad_id
        self.vocab = vocab  # the tokenizer's length: a padded head's extra rows are cut off
        self.device = next(model.parameters()).device
        head = model.get_output_embeddings()
        self._captured: list[torch.Tensor] = []
        self._hook = head.register_forward_hook(lambda mod, inp, out: self._captured.append(inp[0]))

    def close(self) -> None:
        self._hook.remove()

    @torch.no_grad()
    def __call__(self, sequences: list[list[int]], *, keep_logits: bool | list[bool] = False) -> list[Record]:
        """Run the teacher on ``sequences`` (token id lists); see the module docstring."""
        lengths = [len(s) for s in sequences]
        width = max(lengths)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        self._captured.clear()
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
        if len(self._captured) != 1:
            raise RuntimeError(f"expected the output head to run once, it ran {len(self._captured)} times")
        hidden = self._captured.pop()
        logits = out.logits if out.logits.dtype == torch.float32 else out.logits.float()
        keep = keep_logits if isinstance(keep_logits, list) else [keep_logits] * len(sequences)
        k = max(1, self.top_k)
        records: list[Record] = []
        for i, n in enumerate(lengths):
            rows = logits[i, :n, :self.vocab]  # a view: padding (and padded vocabulary rows) never touched
            rec: Record = {"hidden": hidden[i, :n].float().cpu()}
            if keep[i]:
                rec["logits"] = rows.detach().clone().cpu()
            tv, ti = torch.topk(rows, k, dim=-1)
            top1 = tv[:, :1]
            # exact log-sum-exp in one in-place pass (the logits are ours to overwrite now)
            rec["logsumexp"] = (top1.squeeze(-1) + rows.sub_(top1).exp_().sum(-1).log()).cpu()
            rec["argmax"] = ti[:, 0].cpu()
            if self.top_k:
                rec["topk_values"] = tv.cpu()
                rec["topk_indices"] = ti.cpu()
            records.append(rec)
        return records


def reconstruct_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden @ weight.T (+ bias)`` in fp32: the full teacher logits rebuilt from the cache."""
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    return logits


def kl_stats(real: torch.Tensor, approx: torch.Tensor, temperature: float) -> dict[str, float]:
    """KL(softmax(real/T) || softmax(approx/T)) per row: mean and max; and top-1 agreement."""
    from .losses import fkl

    kl = fkl(approx, real, temperature=temperature).clamp_min(0)
    return {
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float((real.argmax(-1) == approx.argmax(-1)).float().mean()),
    }


def reconstruction_check(logits: torch.Tensor, hidden: torch.Tensor, stored_hidden: torch.Tensor | None,
                         weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, Any]:
    """Compare real logits with logits rebuilt from the exact and from the stored hidden state.

    ``exact`` measures whether the architecture's logits are a plain linear head of its hidden
    state (false with soft-capping, logit scaling, or a head we cannot see); ``stored`` measures
    what the storage mode (fp16, compact, ...) adds on top.
    """
    rec = reconstruct_logits(hidden, weight, bias)
    scale = float(logits.abs().max().clamp_min(1e-6))
    res: dict[str, Any] = {
        "tokens": int(logits.shape[0]),
        "exact_max_abs_err": float((rec - logits).abs().max()),
        "exact_rel_err": float((rec - logits).abs().max()) / scale,
        "exact_t1": kl_stats(logits, rec, 1.0),
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

"""The one teacher-forward function, shared by stage one (caching) and the live teacher stage.

It runs the model's body once on a right-padded batch and returns, per example, the teacher's
outputs at the requested positions ``positions`` (LongTensor[m]; position i holds what the teacher
emitted after reading ``input_ids[: i + 1]``), the record layout of :mod:`dskd_batch.records`:

- ``hidden``: the input of the LM head (after the final norm), fp32 [m, d]
- ``topk_values`` / ``topk_indices``: top-k of the real logits [m, k]
- ``logsumexp``: log-sum-exp of the full real logits [m]
- ``argmax``: the teacher's top-1 token [m]

A forward pre-hook on the model's own output head hands the head only the requested positions,
so the head, top-k and log-sum-exp run where training reads them (the response positions, a small
share of an instruction corpus's tokens) and nothing else. Whatever the architecture does before
its head (final norm, scaling) is included, and the logits are the model's real logits,
soft-capping or bias included. Whether ``hidden @ W.T (+ b)`` reproduces
them is then checked, not assumed (see :func:`reconstruction_check`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

Record = dict[str, Any]


class TeacherForward:
    """Callable wrapper around a causal LM that yields teacher records for a batch of sequences."""

    def __init__(self, model: Any, top_k: int, pad_id: int, vocab: int | None = None) -> None:
        self.model = model
        self.top_k = top_k
        self.pad_id = pad_id
        self.vocab = vocab  # the tokenizer's length: a padded head's extra rows are cut off
        self.device = next(model.parameters()).device
        head = model.get_output_embeddings()
        self._captured: list[torch.Tensor] = []
        self._select: tuple[torch.Tensor, torch.Tensor] | None = None
        self._hook = head.register_forward_pre_hook(self._gather)

    def _gather(self, module: Any, args: tuple) -> tuple | None:
        """The head's input at the selected (row, position) pairs only, as one [1, M, d] batch: the
        head (and whatever the model does to its logits after it) runs on those positions alone."""
        h = args[0]
        if self._select is not None:
            b, p = self._select
            h = h[b, p].unsqueeze(0)
        self._captured.append(h)
        return (h, *args[1:])

    def close(self) -> None:
        self._hook.remove()

    def __call__(self, sequences: list[list[int]], *, positions: list[list[int]] | None = None,
                 keep_logits: bool | list[bool] = False) -> list[Record]:
        """Run the teacher on ``sequences`` (token id lists) and return its outputs at ``positions``
        (per sequence, increasing; default: every position); see the module docstring."""
        return self.launch(sequences, positions=positions, keep_logits=keep_logits).wait()

    def _upload(self, t: Tensor) -> Tensor:
        """A host tensor on the teacher's device without waiting for the work queued there (pinned
        memory, asynchronous copy; a pageable copy would wait for the previous batch's forward)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    @torch.no_grad()
    def launch(self, sequences: list[list[int]], *, positions: list[list[int]] | None = None,
               keep_logits: bool | list[bool] = False) -> "PendingRecords":
        """Queue the teacher's forward on ``sequences`` and the copies of its outputs to the host;
        :meth:`PendingRecords.wait` gives the records of :meth:`__call__`. On a GPU this returns
        before the device has finished, so the caller can queue the next batch while another thread
        stores this one."""
        lengths = [len(s) for s in sequences]
        if positions is None:
            positions = [list(range(n)) for n in lengths]
        width = max(lengths)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        pos = [torch.as_tensor(p, dtype=torch.long) for p in positions]
        for i, (p, n) in enumerate(zip(pos, lengths)):
            if len(p) and (int(p.min()) < 0 or int(p.max()) >= n):
                raise ValueError(f"sequence {i}: positions outside 0..{n - 1}")
        rows = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(pos)])
        self._select = (self._upload(rows), self._upload(torch.cat(pos)))
        self._captured.clear()
        try:
            out = self.model(input_ids=self._upload(ids), attention_mask=self._upload(mask), use_cache=False)
        finally:
            self._select = None
        if len(self._captured) != 1:
            raise RuntimeError(f"expected the output head to run once, it ran {len(self._captured)} times")
        hidden = self._captured.pop()[0]  # [M, d] in the teacher's dtype; made fp32 on the host (exact)
        logits = out.logits[0, :, :self.vocab]  # [M, V]: padded vocabulary rows cut off
        logits = logits if logits.dtype == torch.float32 else logits.float()
        keep = keep_logits if isinstance(keep_logits, list) else [keep_logits] * len(sequences)
        counts = [len(p) for p in pos]
        kept = {f"logits{i}": part.detach().clone() for i, part in enumerate(logits.split(counts)) if keep[i]}
        tv, ti = torch.topk(logits, max(1, self.top_k), dim=-1)
        top1 = tv[:, :1]
        finite = torch.stack([torch.isfinite(t).all() for t in (hidden, top1, *kept.values())]).all()
        # exact log-sum-exp in one in-place pass (the logits are ours to overwrite now)
        lse = top1.squeeze(-1) + logits.sub_(top1).exp_().sum(-1).log()
        finite = finite & torch.isfinite(lse).all()
        outs = {"hidden": hidden, "logsumexp": lse, "topk_values": tv, "topk_indices": ti, "finite": finite, **kept}
        return PendingRecords(pos, self.top_k, *_to_host(outs, self.device))


def _to_host(tensors: dict[str, Tensor], device: torch.device) -> tuple[dict[str, Tensor], Any]:
    """Host copies of device tensors: on a GPU, asynchronous copies into pinned memory and the event
    that says they are done; elsewhere the tensors themselves."""
    if device.type != "cuda":
        return {k: v.detach().cpu() for k, v in tensors.items()}, None
    host = {}
    for k, v in tensors.items():
        buf = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        buf.copy_(v.detach(), non_blocking=True)
        host[k] = buf
    done = torch.cuda.Event()
    done.record()
    return host, done


class PendingRecords:
    """The outputs of one :meth:`TeacherForward.launch`, on their way to the host."""

    def __init__(self, positions: list[Tensor], top_k: int, host: dict[str, Tensor], done: Any) -> None:
        self.positions = positions
        self.top_k = top_k
        self.host = host
        self.done = done
        self.finite = True  # every output finite (known after wait)
        self.whole: Record | None = None  # the batch's record fields over all its positions (after wait)

    def wait(self) -> list[Record]:
        """The records, once the copies are done (blocks this thread only)."""
        if self.done is not None:
            self.done.synchronize()
        h = self.host
        self.finite = bool(h["finite"])
        whole: Record = {"positions": torch.cat(self.positions), "hidden": h["hidden"].float(),
                         "logsumexp": h["logsumexp"], "argmax": h["topk_indices"][:, 0]}
        if self.top_k:
            whole.update(topk_values=h["topk_values"], topk_indices=h["topk_indices"])
        self.whole = whole
        records: list[Record] = []
        lo = 0
        for i, p in enumerate(self.positions):  # each example's rows of the batch's fields
            hi = lo + len(p)
            rec: Record = {k: v[lo:hi] for k, v in whole.items()}
            rec["positions"] = p
            if f"logits{i}" in h:
                rec["logits"] = h[f"logits{i}"]
            records.append(rec)
            lo = hi
        return records


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
        fields of :data:`dskd_batch.records.TEACHER_FIELDS` as attributes), from the best source
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
    from .losses import fkl

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

"""The one teacher-forward function, shared by stage one (caching) and the live teacher stage.

It runs the model's body once on a right-padded batch and returns, per example, the teacher's
outputs at the requested positions ``positions`` (LongTensor[m]; position i holds what the teacher
emitted after reading ``input_ids[: i + 1]``), the record layout of :mod:`dskd_batch.cache.records`:

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

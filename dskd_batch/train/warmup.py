"""`init-student --tokenizer OTHER --warmup-steps N`: the composed rows learnt against the teacher.

A transplanted vocabulary's composed rows (a token the teacher spells with several of its own, such
as GPT-2's ` 16` for SmolLM2's ` ` `1` `6`) start as a mean of the spelling tokens' rows: the
student's body then reads a vector it has never seen and its head scores the token with a row no
training shaped. The warm-up trains those rows alone (every other weight stays as transplanted)
against the full teacher on the calibration rows, with ALM's loss (:class:`..methods.cross_vocab.ALM`):
every text is cut at the bytes where both tokenizations put a token boundary, and the student's
likelihood of each such chunk is matched to the teacher's, the binarised KL at ``tau``. A chunk
that holds a composed token as the next token trains its head row; a chunk read after one trains its
input row (tied heads: the same row). The teacher's chunk likelihoods are computed once.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DskdError

log = logging.getLogger(__name__)


@dataclass
class _Row:
    ids: list[int]  # the student's tokens of the text
    chunk: list[int]  # per prediction (position i predicts token i + 1): its chunk, -1 for none
    log_p: torch.Tensor  # [chunks] the teacher's log-likelihood of each chunk


def warmup_texts(data: str | Path, tok: Any, template: str, *, limit: int, columns: str | None = None) -> list[str]:
    """The first ``limit`` rows of ``data`` as whole texts (prompt rendered with ``template``, then the
    response; every assistant turn of a conversation in the chat template's rendering)."""
    from ..data import load_examples, render_prompt, resolve_template

    template = resolve_template(template, tok)
    texts = []
    for ex in load_examples(data, limit=limit, columns=columns).examples:
        texts.append(render_prompt(ex, template, tok) + (ex.messages[-1][1] if ex.is_chat else ex.response))
    return [t for t in texts if t.strip()]


def _chunks(text: str, t_ids: list[int], s_ids: list[int], t_table: Any, s_table: Any) -> tuple[list[int], list[int]]:
    """The ALM chunk of each prediction on both sides (-1: none), chunks holding a text's first token
    dropped (nothing predicts it)."""
    from ..cache.align import chunk_ids, content_spans

    raw = text.encode("utf-8")
    ct, cs = chunk_ids(content_spans(t_ids, t_table, raw), content_spans(s_ids, s_table, raw), False, False)
    first = {ct[0], cs[0]} - {-1}
    return [-1 if c in first else c for c in ct[1:]], [-1 if c in first else c for c in cs[1:]]


def _target_log_probs(model: Any, ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every next token, [B, L-1], and the mask of real predictions."""
    width = max(len(x) for x in ids)
    inp = torch.full((len(ids), width), pad, dtype=torch.long)
    att = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, :len(x)] = torch.tensor(x)
        att[i, :len(x)] = 1
    device = next(model.parameters()).device
    logits = model(input_ids=inp.to(device), attention_mask=att.to(device), use_cache=False).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, inp[:, 1:, None].to(device)).squeeze(-1)
    return lp, att[:, 1:].bool().to(device)


def warm_up_composed(student: Any, student_tok: Any, teacher: Any, teacher_tok: Any, pieces: list[int], data: str | Path,
                     template: str = "auto", *, steps: int, lr: float = 1e-3, rows: int = 256, batch_size: int = 8,
                     max_tokens: int = 512, tau: float = 100.0, seed: int = 0,
                     columns: str | None = None) -> dict[str, Any]:
    """Train ``student``'s composed rows (``pieces[j] > 1``) for ``steps`` steps against ``teacher`` on
    the first ``rows`` rows of ``data`` (module docstring); in place. Returns the figures (chunks, the
    loss and the mean chunk log-likelihood gap before and after)."""
    from ..cache.align import token_table
    from ..methods.cross_vocab import binary_kl

    if steps <= 0:
        raise DskdError(f"--warmup-steps must be positive, got {steps}")
    t0 = time.perf_counter()
    texts = warmup_texts(data, student_tok, template, limit=rows, columns=columns)
    if not texts:
        raise DskdError(f"no warm-up text in {data}")
    s_table, t_table = token_table(student_tok), token_table(teacher_tok)
    t_pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else 0
    s_pad = student_tok.pad_token_id if student_tok.pad_token_id is not None else 0
    encoded = []
    for text in texts:
        t_ids = teacher_tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
        s_ids = student_tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(t_ids) > 1 and len(s_ids) > 1:
            encoded.append((text, t_ids, s_ids))
    data_rows: list[_Row] = []
    teacher.eval()
    with torch.no_grad():
        for b in range(0, len(encoded), batch_size):
            part = encoded[b:b + batch_size]
            lp, real = _target_log_probs(teacher, [t for _, t, _ in part], t_pad)
            for i, (text, t_ids, s_ids) in enumerate(part):
                ct, cs = _chunks(text, t_ids, s_ids, t_table, s_table)
                n = max(max(ct, default=-1), max(cs, default=-1)) + 1
                if n == 0:
                    continue
                c = torch.tensor(ct)
                keep = (c >= 0) & real[i, :len(ct)].cpu()
                log_p = torch.zeros(n, dtype=torch.float64).index_add_(0, c[keep], lp[i, :len(ct)].cpu()[keep].double())
                data_rows.append(_Row(s_ids, cs, log_p.float()))
    if not data_rows:
        raise DskdError(f"no chunk of {data} is cut at the same bytes by both tokenizers")

    emb = student.get_input_embeddings().weight
    head = student.get_output_embeddings()
    params = [emb] if head is None or head.weight is emb else [emb, head.weight]
    composed = torch.tensor([p > 1 for p in pieces] + [False] * (emb.shape[0] - len(pieces)), device=emb.device)
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    hooks = [p.register_hook(lambda g: g * composed[:, None].to(g.dtype)) for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def batch_loss(batch: list[_Row]) -> tuple[torch.Tensor, float, int]:
        lq, real = _target_log_probs(student, [r.ids for r in batch], s_pad)
        chunk_q, chunk_p, offset, flat_c, flat_q = [], [], 0, [], []
        for i, r in enumerate(batch):
            c = torch.tensor(r.chunk, device=lq.device)
            keep = (c >= 0) & real[i, :len(c)]
            flat_c.append(c[keep] + offset)
            flat_q.append(lq[i, :len(c)][keep])
            chunk_p.append(r.log_p.to(lq.device))
            offset += len(r.log_p)
        q = lq.new_zeros(offset).index_add(0, torch.cat(flat_c), torch.cat(flat_q))
        p = torch.cat(chunk_p)
        seen = torch.zeros(offset, dtype=torch.bool, device=lq.device).index_fill(0, torch.cat(flat_c), True)
        loss = binary_kl(p[seen] / tau - 1e-6, q[seen] / tau - 1e-6).mean()
        return loss, float((p[seen] - q[seen]).detach().mean()), int(seen.sum())

    def evaluate() -> tuple[float, float, int]:
        with torch.no_grad():
            out = [batch_loss(data_rows[b:b + batch_size]) for b in range(0, len(data_rows), batch_size)]
        n = sum(o[2] for o in out)
        return (sum(float(o[0]) * o[2] for o in out) / n, sum(o[1] * o[2] for o in out) / n, n)

    was_training = student.training
    student.eval()  # no dropout: the rows learn the teacher's body as it runs at inference
    try:
        loss0, gap0, n_chunks = evaluate()
        done = 0
        while done < steps:
            order = torch.randperm(len(data_rows), generator=gen).tolist()
            for b in range(0, len(order), batch_size):
                if done == steps:
                    break
                loss, _, _ = batch_loss([data_rows[i] for i in order[b:b + batch_size]])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
                if done % 10 == 0 or done == steps:
                    log.info("warm-up step %d/%d: loss %.4g", done, steps, float(loss.detach()))
        loss1, gap1, _ = evaluate()
    finally:
        for h in hooks:
            h.remove()
        for p in student.parameters():
            p.requires_grad_(True)
        student.train(was_training)
    if not math.isfinite(loss1):
        raise DskdError("the warm-up diverged (its loss is not finite)", hint="lower --warmup-lr")
    return {"data": str(data), "rows": len(data_rows), "chunks": n_chunks, "steps": steps, "lr": lr, "tau": tau,
            "batch_size": batch_size, "loss_before": loss0, "loss_after": loss1,
            "chunk_nll_gap_before": gap0, "chunk_nll_gap_after": gap1, "seconds": time.perf_counter() - t0}

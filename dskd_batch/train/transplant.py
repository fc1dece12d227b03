"""A student with another tokenizer's vocabulary (`init-student --tokenizer OTHER`): a student for the
cross-vocabulary methods that starts close to the teacher.

:func:`transplant_vocabulary` builds its input embeddings, and its head if untied, row by row: a
token whose bytes equal a teacher token's gets that token's row (*copied*); any other token gets the
mean of the rows of the teacher tokens that spell its bytes, longest match first (*composed*); a
token that stands for no text (special tokens other than EOS/BOS/PAD, which map to the teacher's)
gets a random row with the teacher's per-dimension mean and std (*random*). ``transplant.json``
records the counts.

A mean of rows makes a poor output row: at full depth on the demo's training rows the GPT-2
transplant's 13,275 composed tokens take 48% of the probability mass at the average position,
where they are 20% of the tokens. With ``--calibration`` rows, :func:`calibrate_composed` lowers each
composed token's output logit by ``beta * (pieces - 1) * (h . u)`` (``u``: the direction of the
mean head input; a longer spelling costs more), with the one scalar ``beta`` solved on the
calibration rows so that the composed tokens' mass there equals their share of the text. Tied
embeddings move with the head; an untied head is calibrated alone.

A mean is also a vector the body has never read (GPT-2's ` 16` for SmolLM2's ` ` `1` `6`). With
``--warmup-steps``, :func:`warm_up_composed` then trains the composed rows alone (every other
weight stays as transplanted) against the whole teacher on the calibration rows with ALM's loss
(:class:`..methods.cross_vocab.ALM`): each text is cut at the bytes where both tokenizations end a
token, and the student's likelihood of each chunk is matched to the teacher's (the binarised KL at
``tau``). A chunk whose tokens include a composed one trains its head row; a chunk read after one
trains its input row (a tied head: the same row). The teacher's chunk likelihoods are computed once.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DskdError
from .batches import calibration_batches

log = logging.getLogger(__name__)


def spell(text: bytes, index: dict[bytes, int], longest: int) -> list[int] | None:
    """Token ids whose bytes concatenate to ``text``, greedy longest match (None if impossible)."""
    ids, i = [], 0
    while i < len(text):
        for n in range(min(longest, len(text) - i), 0, -1):
            j = index.get(text[i:i + n])
            if j is not None:
                ids.append(j)
                i += n
                break
        else:
            return None
    return ids


def _special_map(teacher_tok: Any, student_tok: Any) -> dict[int, int]:
    out = {}
    for name in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id"):
        s, t = getattr(student_tok, name, None), getattr(teacher_tok, name, None)
        if s is not None and t is not None and s not in out:
            out[int(s)] = int(t)
    return out


def transplant_vocabulary(model: Any, teacher_tok: Any, student_tok: Any, seed: int = 0,
                          how: str = "transplant") -> dict[str, Any]:
    """Give ``model`` (the teacher's architecture and weights) ``student_tok``'s vocabulary, in
    place; returns the counts of copied, composed and random rows. ``how="random"`` makes every row
    random (the baseline the transplant is measured against)."""
    from ..cache.align import text_index, token_table

    tt, st = token_table(teacher_tok), token_table(student_tok)
    index = text_index(tt)
    longest = max(len(b) for b in index)
    specials = _special_map(teacher_tok, student_tok)
    plan: list[list[int] | None] = []
    counts = {"copied": 0, "composed": 0, "random": 0}
    for j, b in enumerate(st.texts):
        rows = None
        if how == "transplant":
            if j in specials:
                rows = [specials[j]]
            elif b:
                rows = [index[b]] if b in index else spell(b, index, longest)
        kind = "random" if rows is None else "copied" if len(rows) == 1 else "composed"
        counts[kind] += 1
        plan.append(rows)
    gen = torch.Generator().manual_seed(seed)
    v_t = len(teacher_tok)

    def rebuild(old: torch.Tensor) -> torch.Tensor:
        old = old.detach().float()[:v_t]
        mean, std = old.mean(0), old.std(0)
        new = mean + std * torch.randn(len(plan), old.shape[1], generator=gen)
        for j, rows in enumerate(plan):
            if rows is not None:
                new[j] = old[rows].mean(0)
        return new

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    new_emb = rebuild(emb.weight)
    new_head = None if tied or head is None else rebuild(head.weight)
    model.resize_token_embeddings(len(plan), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(new_emb)
        if new_head is not None:
            model.get_output_embeddings().weight.copy_(new_head)
            if getattr(model.get_output_embeddings(), "bias", None) is not None:
                model.get_output_embeddings().bias.zero_()
    if tied:
        model.tie_weights()
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(student_tok, name, None)
        setattr(model.config, name, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, name, value)
    pieces = [0 if rows is None else len(rows) for rows in plan]
    return {**counts, "student_vocab": len(plan), "teacher_vocab": v_t, "tied_head": tied, "how": how,
            "pieces": pieces}


@torch.no_grad()
def calibrate_composed(model: Any, tok: Any, pieces: list[int], data: str | Path, template: str = "auto", *,
                       limit: int = 64, max_len: int = 512, batch_size: int = 8, positions: int = 4096,
                       columns: str | None = None) -> dict[str, float]:
    """Lower the output logits of the composed tokens (``pieces[j]`` > 1 teacher tokens spell token
    ``j``) so that, on the calibration rows, the probability mass they take equals their share of
    the rows' tokens: row ``j`` of the head moves by ``-beta * (pieces[j] - 1) * u``, ``u`` the unit
    direction of the mean head input, ``beta`` found by bisection. In place; returns the figures."""
    from ..models import head_inputs

    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise DskdError(f"cannot calibrate the composed rows of a {type(head).__name__} head")
    w = head.weight
    extra = torch.tensor([max(p - 1, 0) for p in pieces], dtype=torch.float32)
    extra = torch.nn.functional.pad(extra, (0, w.shape[0] - len(extra)))
    composed = extra > 0
    hs, n_composed, n_tokens, n_rows = [], 0, 0, 0
    was_training = model.training
    model.eval()
    try:
        for mb in calibration_batches(model, tok, data, template, limit=limit, max_len=max_len,
                                      batch_size=batch_size, columns=columns):
            real = mb.attention_mask.bool()
            hs.append(head_inputs(model, mb.input_ids, mb.attention_mask, real).float().cpu())
            ids = mb.input_ids[real].cpu()
            n_composed += int(composed[ids].sum())
            n_tokens += len(ids)
            n_rows += mb.input_ids.shape[0]
    finally:
        model.train(was_training)
    if not n_tokens:
        raise DskdError(f"no calibration tokens in {data}")
    h = torch.cat(hs)
    h = h[torch.randperm(len(h), generator=torch.Generator().manual_seed(0))[:positions]]
    u = h.mean(0)
    u = u / u.norm()
    w0 = w.detach().float().cpu()
    logits0, hu = h @ w0.T, h @ u  # a row moved by -beta*e*u changes its logit by -beta*e*(h.u)
    share = n_composed / n_tokens

    def mass(beta: float) -> float:
        shifted = logits0 - beta * hu[:, None] * extra[None, :]
        return float(shifted.softmax(-1)[:, composed].sum(-1).mean())

    before = mass(0.0)
    figures = {"rows": n_rows, "tokens": n_tokens, "positions": len(h), "composed_share": share,
               "composed_mass_before": before, "positive_h_u": float((hu > 0).float().mean())}
    if before <= share:
        return {**figures, "composed_mass_after": before, "beta": 0.0, "skipped": "the composed mass is not above their share"}
    if figures["positive_h_u"] < 0.99:  # the shift would not lower the logits everywhere: it is no bias
        log.warning("composed rows not calibrated: the head inputs share no direction (h . u > 0 at %.0f%% of the "
                    "positions)", 100 * figures["positive_h_u"])
        return {**figures, "composed_mass_after": before, "beta": 0.0, "skipped": "the head inputs share no direction"}
    lo, hi = 0.0, 1.0
    while mass(hi) > share:
        if hi > 1e6:
            log.warning("composed rows not calibrated: their mass stays above their share however far they move")
            return {**figures, "composed_mass_after": before, "beta": 0.0, "skipped": "the share cannot be reached"}
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mass(mid) > share else (lo, mid)
    w.data -= (hi * extra[:, None] * u[None, :]).to(w.dtype).to(w.device)
    return {**figures, "composed_mass_after": mass(hi), "beta": hi}


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
    from ..methods.cross_vocab import chunk_kl

    if steps <= 0:
        raise DskdError(f"--warmup-steps must be positive, got {steps}")
    if not any(p > 1 for p in pieces):
        log.warning("no composed rows to warm up: every token of the new vocabulary is one of the teacher's")
        return {"data": str(data), "steps": 0, "skipped": "no composed rows"}
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
        chunk_p, offset, flat_c, flat_q = [], 0, [], []
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
        loss = chunk_kl(p[seen], q[seen], tau).mean()
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

"""Batched sampling from a causal LM: the teacher's responses for SeqKD (stage one, ``--generate``),
and later the student's samples (on-policy) and evaluation.

Prompts are left-padded so every row's new tokens start at the same column; generation stops at
EOS (the new tokens after the first EOS are dropped). Sampling is seeded by the caller, so the
same prompts and seed give the same responses (a resumed cache regenerates a shard identically).

Repeated n-grams are blocked by :class:`NoRepeatNGram`, a vectorised equivalent of transformers'
``no_repeat_ngram_size`` (whose per-row Python loop took about a fifth of an evaluation's time on
CPU); it runs first and the sampling warpers after it, in the order ``generate`` itself uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    no_repeat_ngram_size: int = 0

    def generate_kwargs(self) -> dict[str, Any]:
        """``generate``'s arguments: the n-gram block, then temperature and top-p, as processors in
        that order (the order ``generate`` applies its own), so none of its defaults is built."""
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        procs: list[Any] = [NoRepeatNGram(self.no_repeat_ngram_size)] if self.no_repeat_ngram_size else []
        kw: dict[str, Any] = {"do_sample": self.temperature > 0}
        if self.temperature > 0:
            kw.update(temperature=1.0, top_p=1.0, top_k=0)
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        if procs:
            kw["logits_processor"] = LogitsProcessorList(procs)
        return kw


class NoRepeatNGram:
    """Bans, in each row, every token that would complete an n-gram already present in that row
    (prompt and padding included, as transformers' ``NoRepeatNGramLogitsProcessor`` does, with the
    same result): one comparison of the row's last n - 1 tokens against all its windows."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"no_repeat_ngram_size must be >= 1, got {n}")
        self.n = n

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n, length = self.n, input_ids.shape[1]
        if length < n:
            return scores
        windows = input_ids.unfold(1, n, 1)  # [B, L - n + 1, n]
        hit = (windows[:, :, :-1] == input_ids[:, None, length - n + 1:]).all(-1)
        rows, at = hit.nonzero(as_tuple=True)
        scores = scores.clone()
        scores[rows, windows[rows, at, -1]] = -float("inf")
        return scores


@torch.no_grad()
def sample_responses(model: Any, prompts: list[list[int]], *, pad_id: int, eos_id: int, settings: SamplingSettings,
                     max_new: list[int] | None = None, vocab: int | None = None) -> list[list[int]]:
    """New token ids for each prompt (EOS and what follows it removed); ``max_new`` caps each row.
    ``vocab`` (the tokenizer's length) keeps the rows of a padded head from ever being sampled."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    limit = max(max_new) if max_new else settings.max_new_tokens
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(1, limit),
                         pad_token_id=pad_id, eos_token_id=eos_id, **settings.generate_kwargs(),
                         **_suppress_padding(model, vocab))
    new = out[:, width:].tolist()
    res = []
    for i, row in enumerate(new):
        if eos_id in row:
            row = row[:row.index(eos_id)]
        res.append(row[: max_new[i]] if max_new else row)
    return res


def _suppress_padding(model: Any, vocab: int | None) -> dict[str, Any]:
    rows = int(model.get_output_embeddings().weight.shape[0])
    return {"suppress_tokens": list(range(vocab, rows))} if vocab is not None and rows > vocab else {}

"""Cross-tokenizer alignment on real tokenizers and real data: coverage and speed.

    python benchmarks/bench_align.py [--limit 2000]

For each (teacher, student) pair of ``../shared/tokenizers`` (both directions), over the
Self-Instruct seed tasks and the first ``--limit`` T0-mixture rows (Alpaca template, max_len 512):

- ETA coverage: ETA pairs / student response tokens (EOS included), as ``dskd-batch align``
  reports it; "top-1 mapped": pairs whose teacher top-1 is one student token, with a teacher that
  predicts the true next token (an upper bound for a good teacher);
- MinED coverage: student positions matched one-to-one with a teacher token of the same text;
- reference walk: the DSKDv2 reference's token-string walk (``Ġ``/``▁`` deleted, tokens compared
  while the two concatenations agree), re-implemented here from its description, for comparison;
- examples/s of the whole per-example alignment (tokenize, ETA, MinED) on one core.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from dskd_batch.cache.align import align_example, response_targets, space_swap, token_table, vocab_map
from dskd_batch.data import encode, load_examples, render_prompt

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PAIRS = [("gpt2", "qwen2"), ("llama2", "gpt2"), ("llama2", "llama3"), ("smollm2", "gpt2"), ("phi3", "qwen2")]


def reference_walk(t_pieces: list[str], s_pieces: list[str]) -> int:
    """Pairs found by walking the two token-string sequences with the marker characters removed."""
    t = [p.replace("▁", "").replace("Ġ", "") for p in t_pieces]
    s = [p.replace("▁", "").replace("Ġ", "") for p in s_pieces]
    i = j = pairs = 0
    ht = hs = ""
    while i < len(t) and j < len(s):
        if ht == hs and t[i] == s[j]:
            ht, hs, i, j, pairs = ht + t[i], hs + s[j], i + 1, j + 1, pairs + 1
        elif len(ht) > len(hs):
            hs, j = hs + s[j], j + 1
        elif len(ht) < len(hs):
            ht, i = ht + t[i], i + 1
        else:
            ht, hs, i, j = ht + t[i], hs + s[j], i + 1, j + 1
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=2000)
    args = ap.parse_args()
    exs = (load_examples(SHARED / "data/self_instruct_seed/seed_tasks.jsonl").examples
           + load_examples(SHARED / "data/t0_mix/train.jsonl", limit=args.limit).examples)
    toks = {n: AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / n)) for n in {x for p in PAIRS for x in p}}
    tables = {n: token_table(t) for n, t in toks.items()}
    print(f"{len(exs)} examples (Self-Instruct seed + T0 mixture)\n")
    print("| teacher → student | ETA coverage | top-1 mapped | MinED | reference walk | shared tokens | examples/s |")
    print("|---|---|---|---|---|---|---|")
    for t, s in PAIRS + [(b, a) for a, b in PAIRS]:
        tt, st = toks[t], toks[s]
        t2s, t_swap = vocab_map(tables[t], tables[s]), space_swap(tables[t])
        pos = pairs = lab = mined = walk = 0
        t0 = time.perf_counter()
        for ex in exs:
            p = render_prompt(ex, "alpaca")
            te = encode(tt, p, ex.response, max_prompt_len=256, max_len=512, template="alpaca")
            se = encode(st, p, ex.response, max_prompt_len=256, max_len=512, template="alpaca")
            oracle = np.array(te.input_ids[1:] + [tt.eos_token_id])[te.targets()]  # argmax at the target positions
            a = align_example(ex.response, te.input_ids, te.prompt_len, oracle, se, tables[t], tables[s], t2s, t_swap)
            pos += len(a.mined_t)
            pairs += len(a.eta_s)
            lab += sum(1 for x in a.eta_label if x >= 0)
            mined += sum(1 for x in a.mined_t if x >= 0)
        secs = time.perf_counter() - t0
        for ex in exs:
            p = render_prompt(ex, "alpaca")
            te = encode(tt, p, ex.response, max_prompt_len=256, max_len=512, template="alpaca")
            se = encode(st, p, ex.response, max_prompt_len=256, max_len=512, template="alpaca")
            walk += reference_walk(tt.convert_ids_to_tokens(response_targets(te.input_ids, te.prompt_len)),
                                   st.convert_ids_to_tokens(response_targets(se.input_ids, se.prompt_len)))
        print(f"| {t} → {s} | {pairs / pos:.3f} | {lab / pos:.3f} | {mined / pos:.3f} | {walk / pos:.3f} | "
              f"{int((t2s >= 0).sum())} | {len(exs) / secs:.0f} |")


if __name__ == "__main__":
    main()

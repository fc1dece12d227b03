"""What ETA leaves unaligned, and whether any exact alignment could pair it.

    python benchmarks/eta_misses.py [--teacher llama3] [--student llama2] [--limit 2000] [--examples 12]

ETA pairs a student position with a teacher position when their target tokens are the same bytes
at the same offset of the response. Any *exact* one-to-one alignment of next-token predictions
needs exactly that (the same next text after the same context), so the student positions whose
target span no teacher target has are beyond every exact alignment. This script splits the
unpaired student positions into (a) spans that could not be located in the text (a tokenizer
normaliser changed it: the alignment's own loss), (b) EOS that does not pair, and (c) spans that no
teacher token has: a different segmentation, with counts by kind and examples.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from transformers import AutoTokenizer

from dskd_batch.cache.align import content_spans, eta_pairs, response_targets, token_table
from dskd_batch.data import encode, load_examples, render_prompt

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def kind(b: bytes) -> str:
    s = b.decode("utf-8", "replace")
    core = s.strip(" ")
    if not core:
        return "spaces"
    if core.isdigit():
        return "digits"
    if all(c in "\n\r\t " for c in s):
        return "newlines/whitespace"
    if "\n" in s:
        return "text with newline"
    if not core.isalnum():
        return "punctuation/symbols"
    return "word piece"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="llama3")
    ap.add_argument("--student", default="llama2")
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--examples", type=int, default=12)
    a = ap.parse_args()
    exs = (load_examples(SHARED / "data/self_instruct_seed/seed_tasks.jsonl").examples
           + load_examples(SHARED / "data/t0_mix/train.jsonl", limit=a.limit).examples)
    tt, st = (AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / n)) for n in (a.teacher, a.student))
    ttab, stab = token_table(tt), token_table(st)
    total = paired = unlocated = eos_miss = 0
    kinds: Counter[str] = Counter()
    shown = []
    for ex in exs:
        p = render_prompt(ex, "alpaca")
        te = encode(tt, p, ex.response, max_prompt_len=256, max_len=512, template="alpaca")
        se = encode(st, p, ex.response, max_prompt_len=256, max_len=512, template="alpaca")
        text = ex.response.encode("utf-8")
        t_tg, s_tg = response_targets(te.input_ids, te.prompt_len), response_targets(se.input_ids, se.prompt_len)
        t_sp, s_sp = content_spans(t_tg, ttab, text), content_spans(s_tg, stab, text)
        ps, _, _ = eta_pairs(t_sp, s_sp, bool(t_tg) and t_tg[-1] == ttab.eos, bool(s_tg) and s_tg[-1] == stab.eos,
                             [ttab.texts[i] for i in t_tg], [stab.texts[i] for i in s_tg])
        got = set(ps)
        total += len(s_tg)
        paired += len(got)
        t_spans = {sp for sp in t_sp if sp is not None}
        for j, (tok, sp) in enumerate(zip(s_tg, s_sp)):
            if j in got:
                continue
            if tok == stab.eos:
                eos_miss += 1
            elif sp is None:
                unlocated += 1
            else:
                k = kind(text[sp[0]:sp[1]])
                kinds[k] += 1
                if len(shown) < a.examples and k in ("digits", "word piece", "newlines/whitespace", "spaces"):
                    over = [text[s0:s1] for s0, s1 in sorted(t_spans) if s0 < sp[1] and s1 > sp[0]]
                    shown.append((text[sp[0]:sp[1]], over))
    beyond = sum(kinds.values())
    print(f"{a.teacher} -> {a.student}: {len(exs)} examples, {total} student response positions (EOS included)")
    print(f"ETA pairs {paired} ({paired / total:.3f}); unpaired {total - paired}:")
    print(f"  span not located in the text (the alignment's own loss): {unlocated} ({unlocated / total:.4f})")
    print(f"  EOS not paired (responses cut at different offsets): {eos_miss} ({eos_miss / total:.4f})")
    print(f"  no teacher target with the same bytes at the same offset: {beyond} ({beyond / total:.3f})")
    print(f"upper bound of any exact alignment: {(total - beyond) / total:.3f}")
    for k, n in kinds.most_common():
        print(f"    {k}: {n} ({n / total:.3f})")
    print("examples (student target | the teacher targets over the same bytes):")
    for s, over in shown:
        print(f"    {s!r:24} | {' + '.join(repr(o) for o in over)}")


if __name__ == "__main__":
    main()

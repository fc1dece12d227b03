"""`cache-teacher --dry-run`: what a cache will hold and how much disk it will take, before paying
for the teacher's forward.

The corpus is read and tokenized exactly as stage one does it (template, limits, windows of plain
text), so examples, tokens and stored positions are exact. The teacher's weights are not loaded:
its config gives the hidden size and vocabulary. Bytes per stored position, uncompressed:

    d x b_h  +  k x (4 + b_i)  +  12        (b_h: 4 fp32, 2 fp16/bf16, 0.75 compact, 0 none;
                                             b_i: 2 when the vocabulary fits 16 bits, else 4;
                                             12: log-sum-exp, argmax and the position)

plus 4 bytes per token (the token ids), per-shard files (index, metadata), and the head and
embeddings stored once (V x d x 4 bytes each; the embeddings only when untied). Integer arrays
known from the tokenization are compressed for real; the teacher's outputs are not known yet, so
their on-disk size uses the compression measured on real caches (``COMPRESSION``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

# uncompressed / on-disk bytes with Blosc zstd level 1 + byte shuffle, measured on real caches: the
# demo cache (`data/demo/train.jsonl`, SmolLM2-135M in fp32) for an fp32 teacher, and stage one on
# the H200 (a bf16 teacher, whose head input rounded to bf16 leaves fp16's low mantissa bits zero)
COMPRESSION: dict[str, dict[str, float]] = {
    "fp32": {"hidden/fp16": 1.10, "hidden/bf16": 1.10, "hidden/fp32": 1.07, "hidden/compact": 1.0,
             "topk_values": 1.53, "topk_indices/uint16": 1.29, "topk_indices/int32": 1.75, "logsumexp": 1.31,
             "argmax": 4.5},
    "bf16": {"hidden/fp16": 1.28, "hidden/bf16": 1.28, "hidden/fp32": 1.6, "hidden/compact": 1.0,
             "topk_values": 1.53, "topk_indices/uint16": 1.29, "topk_indices/int32": 1.75, "logsumexp": 1.31,
             "argmax": 4.5},
}
SHARD_FILES = 12_500  # bytes of one shard's fixed files (zarr.json of each array, shard.json, the index's frame)
ROOT_FILES = 4_000  # settings.json and the manifest's fixed part (plus MANIFEST_PER_SHARD for each shard's entry)
MANIFEST_PER_SHARD = 400
INDEX_RATIO = 2.5  # the index's texts compress about this much (Parquet)
HIDDEN_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "compact": None, "none": 0.0}


def _compressed(arr: np.ndarray, level: int) -> int:
    if level == 0:
        return arr.nbytes
    from numcodecs import Blosc

    return len(Blosc(cname="zstd", clevel=level, shuffle=Blosc.SHUFFLE, typesize=arr.dtype.itemsize).encode(arr))


def estimate(cfg: Any) -> dict[str, Any]:
    """The dry run of ``cfg`` (a :class:`~dskd_batch.config.CacheConfig`): counts, bytes per array
    and per hidden mode, shards and disk."""
    from .caching import resolved_template_config, stored_positions
    from ..data import prepare_corpus
    from ..models import load_tokenizer, resolve_device, resolve_dtype
    from .source import open_teacher

    teacher = open_teacher(cfg.teacher)  # a local model's tokenizer and config only: no weights load
    tok = teacher.tokenizer
    cfg = resolved_template_config(cfg, tok, [load_tokenizer(s) for s in cfg.student_tokenizer])
    prep = prepare_corpus(cfg, tok)
    conf = teacher.config()
    d = int(conf.hidden_size)
    vocab = len(tok)
    tied = bool(getattr(conf, "tie_word_embeddings", False))
    # only a bf16 head input leaves fp16's low mantissa bits zero; fp16 and fp32 teachers compress alike
    dtype = resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    teacher_dtype = "bf16" if dtype == torch.bfloat16 else "fp32"
    ratios = COMPRESSION[teacher_dtype]
    ids = np.concatenate([np.asarray(e.input_ids, dtype=np.int32) for e in prep.encoded])
    pos = np.concatenate([np.asarray(stored_positions(e, cfg.positions), dtype=np.int32) for e in prep.encoded])
    tokens, positions = int(ids.size), int(pos.size)
    known = {"input_ids": (ids.nbytes, _compressed(ids, cfg.compression_level)),  # compressed for real, once
             "positions": (pos.nbytes, _compressed(pos, cfg.compression_level))}
    index_dtype = "uint16" if vocab <= 65536 else "int32"
    k = cfg.top_k

    def per_array(hidden: str) -> dict[str, tuple[float, float]]:
        """array -> (uncompressed bytes, estimated bytes on disk)."""
        out: dict[str, tuple[float, float]] = {
            **known,
            "logsumexp": (4.0 * positions, 4.0 * positions / ratios["logsumexp"]),
            "argmax": (4.0 * positions, 4.0 * positions / ratios["argmax"]),
        }
        if k:
            b_i = 2 if index_dtype == "uint16" else 4
            out["topk_values"] = (4.0 * k * positions, 4.0 * k * positions / ratios["topk_values"])
            out["topk_indices"] = (b_i * k * positions, b_i * k * positions / ratios[f"topk_indices/{index_dtype}"])
        if hidden != "none":
            per = (3 * d) // 4 if hidden == "compact" else HIDDEN_BYTES[hidden] * d
            out["hidden"] = (per * positions, per * positions / ratios[f"hidden/{hidden}"])
        if cfg.compression_level == 0:
            out = {name: (raw, raw) for name, (raw, _) in out.items()}
        return out

    shards = math.ceil(len(prep.examples) / cfg.shard_size)
    texts = sum(len((ex.instruction + ex.input + ex.response + p).encode()) for ex, p in zip(prep.examples, prep.prompts))
    shard_extra = shards * (SHARD_FILES + MANIFEST_PER_SHARD) + ROOT_FILES + texts / INDEX_RATIO
    import tempfile

    with tempfile.TemporaryDirectory() as t:  # the tokenizer files the cache keeps, as they will be written
        tok.save_pretrained(t)
        tok_files = sum(f.stat().st_size for f in Path(t).rglob("*") if f.is_file())
    teacher_dir = vocab * d * 4 * (1 if tied else 2) + tok_files + (2 * d * d * 4 if cfg.hidden == "compact" else 0)
    modes = {}
    for mode in ("fp16", "bf16", "compact", "none", "fp32"):
        arrays = per_array(mode)
        modes[mode] = {"bytes_per_position": sum(raw for n, (raw, _) in arrays.items() if n != "input_ids") / max(1, positions),
                       "shards_bytes": sum(est for _, est in arrays.values()) + shard_extra}
    chosen = per_array(cfg.hidden)
    shard_bytes = sum(est for _, est in chosen.values()) + shard_extra
    return {
        "teacher": str(cfg.teacher), "data": str(cfg.data), "template": cfg.template, "teacher_dtype": teacher_dtype,
        "hidden_size": d, "vocab": vocab, "tied_embeddings": tied, "examples": len(prep.examples),
        "skipped_rows": prep.skipped, "tokens": tokens, "positions": positions, "positions_mode": cfg.positions,
        "shards": shards, "hidden": cfg.hidden, "top_k": k,
        "arrays": {n: {"raw": raw, "disk": est} for n, (raw, est) in chosen.items()},
        "shard_files": shard_extra, "shards_bytes": shard_bytes, "teacher_dir_bytes": teacher_dir,
        "total_bytes": shard_bytes + teacher_dir, "by_hidden_mode": modes,
    }


def render(est: dict[str, Any]) -> str:
    mib = 2**20
    lines = [
        f"dry run: {est['examples']:,} examples ({est['skipped_rows']} rows skipped), {est['tokens']:,} tokens, "
        f"{est['positions']:,} stored positions ({est['positions_mode']}: "
        f"{100 * est['positions'] / max(1, est['tokens']):.1f}% of the tokens), {est['shards']} shard(s)",
        f"teacher: d = {est['hidden_size']}, V = {est['vocab']:,}, {est['teacher_dtype']}, template {est['template']}",
        f"--hidden {est['hidden']} --top-k {est['top_k']}: per stored position "
        f"{sum(a['raw'] for n, a in est['arrays'].items() if n != 'input_ids') / max(1, est['positions']):,.0f} bytes "
        "uncompressed",
        "",
        "| array | uncompressed MiB | on disk MiB (estimate) |",
        "|---|---|---|",
    ]
    for name, a in est["arrays"].items():
        lines.append(f"| {name} | {a['raw'] / mib:,.2f} | {a['disk'] / mib:,.2f} |")
    lines += [f"| index and metadata | | {est['shard_files'] / mib:,.2f} |",
              f"| **shards** | | **{est['shards_bytes'] / mib:,.2f}** |",
              f"| teacher head, embeddings, tokenizer (once) | | {est['teacher_dir_bytes'] / mib:,.2f} |",
              f"| **total** | | **{est['total_bytes'] / mib:,.2f}** |", "",
              "| --hidden | bytes per stored position (uncompressed) | shards on disk MiB (estimate) |", "|---|---|---|"]
    for mode, m in est["by_hidden_mode"].items():
        lines.append(f"| {mode} | {m['bytes_per_position']:,.0f} | {m['shards_bytes'] / mib:,.2f} |")
    return "\n".join(lines)

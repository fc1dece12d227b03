"""Summaries of a cache for `dskd-batch cache-info`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .records import POSITIONS, TOKENS
from .format import SHARDS, TEACHER, dir_bytes
from .reader import TeacherCache


def cache_summary(cache: TeacherCache) -> dict[str, Any]:
    tokens = max(1, int(cache.manifest["totals"]["tokens"]))
    per_array: dict[str, int] = {}
    for s in cache.shards:
        for axis in (TOKENS, POSITIONS):
            for arr in (cache.path / SHARDS / s["name"] / axis).iterdir():
                per_array[arr.name] = per_array.get(arr.name, 0) + dir_bytes(arr)
    st = cache.settings
    return {
        "path": str(cache.path),
        "fingerprint": cache.fingerprint,
        "examples": len(cache),
        "tokens": cache.manifest["totals"]["tokens"],
        "positions": cache.manifest["totals"]["positions"],
        "bytes_per_example": round(sum(per_array.values()) / max(1, len(cache))),
        "shards": len(cache.shards),
        "bytes": {"shards": cache.manifest["totals"]["bytes"], "teacher": dir_bytes(cache.path / TEACHER)},
        "bytes_per_token": {k: round(v / tokens, 2) for k, v in sorted(per_array.items())}
        | {"total": round(sum(per_array.values()) / tokens, 2)},
        "storage": st["storage"],
        "limits": st["limits"],
        "template": st["template"],
        "teacher": st["teacher"],
        "tokenizer": st["tokenizer"],
        "data": st["data"],
        "logits_source": cache.logits_source,
        "logits_reconstructable": cache.manifest["logits_reconstructable"],
        "fidelity": cache.manifest["fidelity"],
        "alignments": _alignments(cache.path),
        "norm_stats": cache.manifest.get("norm_stats"),
    }


def _alignments(path: Path) -> list[dict[str, Any]]:
    """The complete alignment sidecars of a cache (see :mod:`dskd_batch.cache.align`)."""
    from .align import ALIGN_DIR, ALIGN_FILE
    from .format import read_json

    out = []
    for d in sorted((path / ALIGN_DIR).glob("*")) if (path / ALIGN_DIR).is_dir() else []:
        if (d / ALIGN_FILE).exists():
            info = read_json(d / ALIGN_FILE)
            out.append({"fingerprint": d.name, "source": info["student_tokenizer"]["source"], **info["stats"]})
    return out


def render_summary(info: dict[str, Any]) -> str:
    t = info["teacher"]
    lines = [
        f"cache        {info['path']}",
        f"fingerprint  {info['fingerprint']}",
        f"teacher      {t['architecture']} d={t['hidden_size']} V={t['vocab_size']} dtype={t['dtype']} "
        f"tied={t['tied_embeddings']} fingerprint={t['fingerprint']} ({t['source']})",
        f"tokenizer    fingerprint={info['tokenizer']['fingerprint']} size={info['tokenizer']['size']}",
        f"data         {info['data']['examples']} examples fingerprint={info['data']['fingerprint']} ({info['data']['source']})",
        f"template     {info['template']['name']}   limits: prompt {info['limits']['max_prompt_len']}, total {info['limits']['max_len']}",
        f"storage      hidden={info['storage']['hidden']} top_k={info['storage']['top_k']} "
        f"shard_size={info['storage']['shard_size']} zstd level={info['storage']['compression_level']}",
        f"contents     {info['examples']} examples, {info['tokens']} tokens, teacher stored at {info['positions']} "
        f"positions ({info['storage'].get('positions', 'targets')}), {info['shards']} shards, "
        f"{info['bytes']['shards'] / 2**20:.1f} MiB (+ {info['bytes']['teacher'] / 2**20:.1f} MiB teacher head/embeddings)",
        "bytes/token  " + ", ".join(f"{k} {v}" for k, v in info["bytes_per_token"].items())
        + f"   ({info['bytes_per_example']} bytes per example)",
        f"logits       source={info['logits_source']} (h @ W.T reproduces the teacher: {info['logits_reconstructable']})",
    ]
    fid = info["fidelity"]
    for key in ("exact_t1", "stored_t1", "stored_t2", "assembled_t1", "assembled_t2"):
        if key in fid:
            f = fid[key]
            lines.append(f"fidelity     {key:<13} KL mean {f['kl_mean']:.2e} max {f['kl_max']:.2e} "
                         f"top-1 {100 * f['top1_agreement']:.2f}%"
                         + (f" ({100 * f['top1_within_rounding']:.2f}% up to the teacher's rounding)"
                            if "top1_within_rounding" in f else "") + f" ({fid['tokens']} tokens)")
    for a in info["alignments"]:
        lines.append(f"alignment    {a['source']} (tokenizer {a['fingerprint']}): ETA {100 * a['eta_coverage']:.1f}% of "
                     f"student response tokens ({100 * a['eta_label_coverage']:.1f}% with a mapped teacher top-1), "
                     f"MinED {100 * a['mined_coverage']:.1f}%"
                     + (f", ALM chunks {100 * a['chunk_coverage']:.1f}%" if "chunk_coverage" in a else "")
                     + f", {a['shared_vocab']} shared tokens")
    chk = info.get("check")
    if chk is not None:
        what = ("checksums of every file re-hashed" if chk["kind"] == "sha256" else
                "file presence and sizes checked, contents not hashed (`--verify` or `dskd-batch verify` re-hashes)")
        if chk["problems"]:
            lines.append(f"check        FAILED ({what}): {len(chk['problems'])} problem(s)")
            lines += [f"             {p}" for p in chk["problems"][:20]]
        else:
            lines.append(f"check        ok ({what})")
    return "\n".join(lines)


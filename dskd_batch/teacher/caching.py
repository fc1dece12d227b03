"""Stage one: run the teacher once over a corpus and write a teacher cache.

Order of work: read and validate the corpus and tokenizer (cheap; every bad row is reported
before the model loads), compare with an existing cache's settings (refuse on any difference),
load the teacher, write the once-per-cache files, then write this worker's missing shards, and
finally the manifest once every shard exists. Re-running the same command resumes: finished
shards are skipped, temporary leftovers of a killed run are removed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache.format import (CODEC_FILE, FORMAT_VERSION, HEAD_FILE, MANIFEST, SETTINGS, SHARD_META, SHARDS, TEACHER,
                           TMP_MARK, atomic_write_json, dir_bytes, file_table, read_json, sha256_file,
                           shard_name, tmp_path)
from ..files import fingerprint, flatten
from ..cache.reader import LOSSLESS_HIDDEN, load_codec, verify_shard
from ..cache.writer import ShardWriter, StoreThread
from ..cache.codecs import CompactCodec, HiddenCodec
from ..config import AlignConfig, CacheConfig
from ..data import (Encoded, Prepared, data_fingerprint, encode, length_batches, prepare_corpus, resolve_template,
                   template_fingerprint)
from ..distributed import DistContext
from ..errors import DskdError
from ..models import DTYPE_BY_NAME, load_tokenizer, resolve_device, tokenizer_fingerprint
from ..cache.records import POSITIONS, TOKENS, ArraySpecs, array_specs, rows_at, to_arrays
from .forward import PendingRecords
from .source import Teacher, open_teacher
from ..cache.head import assemble_logits, head_reproduces_logits, reconstruct_logits, reconstruction_check

log = logging.getLogger(__name__)

INFORMATIONAL = ("teacher.source", "data.source")
CALIBRATION_TOKENS = 8192  # positions the compact codec is fitted on ...
CALIBRATION_SCAN_TOKENS = 4 * CALIBRATION_TOKENS  # ... found in at most this many tokens of the corpus's first examples


def settings_diff(old: dict[str, Any], new: dict[str, Any], only: set[str] | None = None) -> list[str]:
    """Human-readable differences between two settings (informational fields ignored)."""
    fo, fn = flatten(old), flatten(new)
    keys = sorted((set(fo) | set(fn)) - set(INFORMATIONAL))
    if only is not None:
        keys = [k for k in keys if k.split(".")[0] in only]
    return [f"{k}: cache has {fo.get(k)!r}, this run has {fn.get(k)!r}" for k in keys if fo.get(k) != fn.get(k)]


def settings_fingerprint(settings: dict[str, Any]) -> str:
    ident = {k: v for k, v in flatten(settings).items() if k not in INFORMATIONAL}
    return fingerprint(ident)


def build_settings(cfg: CacheConfig, tok: Any, prep: Prepared, teacher: Teacher | None) -> dict[str, Any]:
    """The cache's settings: the corpus, tokenizer, template, limits and storage, and (given the
    ``teacher``) its description; without it, what can be compared before the teacher loads."""
    vocab = len(tok)
    s: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "num_examples": len(prep.examples),
        "num_shards": math.ceil(len(prep.examples) / cfg.shard_size),
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tok), "eos_token_id": tok.eos_token_id,
                      "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id, "size": vocab},
        "data": {"source": str(cfg.data), "fingerprint": data_fingerprint(prep.examples),
                 "examples": len(prep.examples), "skipped_rows": prep.skipped},
        "template": {"name": resolve_template(cfg.template, tok), "fingerprint": template_fingerprint(cfg.template, tok)},
        "limits": {"max_prompt_len": cfg.max_prompt_len, "max_len": cfg.max_len, "limit": cfg.limit},
        "storage": {"hidden": cfg.hidden, "top_k": cfg.top_k, "shard_size": cfg.shard_size,
                    "compression_level": cfg.compression_level, "positions": cfg.positions},
    }
    if cfg.generate:
        s["generation"] = {"max_new_tokens": cfg.gen_max_new_tokens, "temperature": cfg.gen_temperature,
                           "top_p": cfg.gen_top_p, "seed": cfg.gen_seed}
    if teacher is not None:
        s["teacher"] = {"source": str(cfg.teacher), **teacher.describe()}
        s["storage"]["topk_index_dtype"] = "uint16" if s["teacher"]["vocab_size"] <= 65536 else "int32"
    return s


def shard_specs(settings: dict[str, Any], codec: HiddenCodec | None) -> ArraySpecs:
    st = settings["storage"]
    return array_specs(st["top_k"], st.get("topk_index_dtype", "int32"), codec)


def stored_positions(enc: Encoded, mode: str) -> list[int]:
    """Where the teacher is stored for an example: its training targets, or every position."""
    return list(range(len(enc.input_ids))) if mode == "all" else enc.targets()


class FidelityAccumulator:
    """Token-weighted means and maxima of :func:`reconstruction_check` results."""

    def __init__(self) -> None:
        self.tokens = 0
        self.sums: dict[str, float] = {}
        self.maxes: dict[str, float] = {}

    def add(self, res: dict[str, Any]) -> None:
        n = int(res["tokens"])
        self.tokens += n
        for key, val in flatten(res).items():
            if key == "tokens":
                continue
            if key.endswith("_max") or key.endswith("err"):
                self.maxes[key] = max(self.maxes.get(key, float("-inf")), float(val))
            else:
                self.sums[key] = self.sums.get(key, 0.0) + float(val) * n

    def merge(self, other: dict[str, Any]) -> None:
        n = int(other.get("tokens", 0))
        if not n:
            return
        self.add(other)

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": self.tokens}
        if not self.tokens:
            return out
        flat = {**{k: v / self.tokens for k, v in self.sums.items()}, **self.maxes}
        for key, val in flat.items():
            node = out
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = val
        return out


def _write_teacher_dir(out: Path, teacher: Teacher, head: dict[str, torch.Tensor],
                       codec_state: dict[str, torch.Tensor] | None) -> None:
    from safetensors.torch import save_file

    final = out / TEACHER
    if final.exists():
        return
    tmp = tmp_path(final)
    tmp.mkdir(parents=True)
    try:
        save_file(head, str(tmp / HEAD_FILE))
        if codec_state is not None:
            save_file({k: v.contiguous() for k, v in codec_state.items()}, str(tmp / CODEC_FILE))
        teacher.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "config.json").write_text(teacher.config_json())
        if final.exists():
            shutil.rmtree(tmp)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def calibration_examples(prep: Prepared) -> tuple[list[int], bool]:
    """The corpus's first examples the compact codec is fitted on: until they hold
    CALIBRATION_TOKENS target positions, or CALIBRATION_SCAN_TOKENS tokens in all (and then
    whether their other positions must top the sample up: a corpus of short responses)."""
    chosen, targets, tokens = [], 0, 0
    for i, enc in enumerate(prep.encoded):
        chosen.append(i)
        targets += len(enc.targets())
        tokens += len(enc.input_ids)
        if targets >= CALIBRATION_TOKENS or tokens >= CALIBRATION_SCAN_TOKENS:
            break
    return chosen, targets < CALIBRATION_TOKENS


def calibrate_compact(tf: Teacher, prep: Prepared, weight: torch.Tensor, batch_tokens: int) -> CompactCodec:
    """Fit the compact codec on the hidden states it will encode: the target positions of the
    corpus's first examples, topped up with their other positions where those are too few for a
    d x d covariance (deterministic, so resumes agree)."""
    chosen, top_up = calibration_examples(prep)
    rows: dict[str, list[torch.Tensor]] = {"hidden": [], "idx": [], "probs": []}
    extra: dict[str, list[torch.Tensor]] = {"hidden": [], "idx": [], "probs": []}
    for batch in length_batches([len(prep.encoded[i].input_ids) for i in chosen], batch_tokens):
        encs = [prep.encoded[chosen[j]] for j in batch]
        recs = tf([e.input_ids for e in encs], positions=None if top_up else [e.targets() for e in encs],
                  keep_logits=True)
        for e, r in zip(encs, recs):
            p, ix = torch.topk(torch.softmax(r["logits"], -1), 64, dim=-1)
            is_target = torch.zeros(len(r["positions"]), dtype=torch.bool)
            is_target[rows_at(r, torch.as_tensor(e.targets(), dtype=torch.long))] = True
            for part, mask in ((rows, is_target), (extra, ~is_target)):
                part["hidden"].append(r["hidden"][mask])
                part["idx"].append(ix[mask])
                part["probs"].append(p[mask])
    got = {k: torch.cat(v) for k, v in rows.items()}
    if top_up:
        need = max(0, CALIBRATION_TOKENS - len(got["hidden"]))
        got = {k: torch.cat([got[k], torch.cat(extra[k])[:need]]) for k in got}
        log.info("compact codec: %d target positions in the first %d examples, topped up with %d other positions",
                 sum(len(h) for h in rows["hidden"]), len(chosen), min(need, sum(len(h) for h in extra["hidden"])))
    return CompactCodec.fit(got["hidden"], weight, got["idx"], got["probs"])


def shard_done(out: Path, s: int) -> bool:
    return (out / SHARDS / shard_name(s) / SHARD_META).exists()


class NormStats:
    """Sums (float64) over the real response positions of every shard, for CMA's normalisation:
    the teacher's hidden states, the input-token and the target-token embeddings."""

    KEYS = ("hidden", "input_embed", "target_embed")

    def __init__(self, embed: torch.Tensor | None) -> None:
        self.embed = embed
        self.sums = {k: [0, 0.0, 0.0] for k in self.KEYS}  # elements, sum, sum of squares

    def _add(self, key: str, x: torch.Tensor) -> None:
        """Each row's sum and sum of squares in float32 (a row: one position's vector), added up in float64."""
        x = x.float().reshape(len(x), -1)
        acc = self.sums[key]
        acc[0] += x.numel()
        acc[1] += float(x.sum(1).double().sum())
        acc[2] += float(torch.linalg.vector_norm(x, dim=1).double().square().sum())

    def add(self, examples: list[tuple[list[int], list[int]]], hidden: torch.Tensor) -> None:
        """A batch: each example's token ids and target positions, and the teacher's hidden states at
        those targets (the examples' rows one after another)."""
        self._add("hidden", hidden)
        if self.embed is not None and examples:
            pos = [(torch.as_tensor(ids), torch.as_tensor(targets, dtype=torch.long)) for ids, targets in examples]
            self._add("input_embed", self.embed[torch.cat([t[p] for t, p in pos])])
            self._add("target_embed", self.embed[torch.cat([t[p + 1] for t, p in pos])])

    @staticmethod
    def merge(parts: list[dict[str, list]]) -> dict[str, Any]:
        """Shard sums -> {key: {count, mean, std}} plus ``index_std`` (of [E(x); E(y)] together)."""
        tot = {k: [0, 0.0, 0.0] for k in NormStats.KEYS}
        for p in parts:
            for k, v in p.items():
                tot[k] = [a + b for a, b in zip(tot[k], v)]

        def stat(n: float, s1: float, s2: float) -> dict[str, float]:
            mean = s1 / n if n else 0.0
            return {"count": n, "mean": mean, "std": math.sqrt(max(s2 / n - mean * mean, 0.0)) if n else 0.0}

        out: dict[str, Any] = {k: stat(*v) for k, v in tot.items()}
        both = [a + b for a, b in zip(tot["input_embed"], tot["target_embed"])]
        out["index_embed"] = stat(*both)
        return out


def write_shard(out: Path, s: int, cfg: CacheConfig, settings: dict[str, Any], prep: Prepared, tf: Teacher,
                codec: HiddenCodec | None, weight: torch.Tensor, bias: torch.Tensor | None, pbar: Any,
                tok: Any = None, embed: torch.Tensor | None = None, *, overlap: bool | None = None) -> None:
    """Run the teacher over shard ``s``'s examples and write the shard. With ``overlap`` (default:
    when the teacher is on a GPU) each batch's records are stored on a thread of their own while
    the teacher runs the next batches (:class:`StoreThread`, two batches queued at most); on a CPU
    the teacher and the storing share the same cores, so they take turns."""
    lo, hi = s * cfg.shard_size, min(len(prep.examples), (s + 1) * cfg.shard_size)
    members = list(range(lo, hi))
    responses = {i: prep.examples[i].response for i in members}
    if cfg.generate:
        responses = generate_shard(tf, tok, cfg, prep, members, seed=cfg.gen_seed * 1_000_003 + s)
        prep = Prepared(prep.examples, prep.prompts, list(prep.encoded), prep.skipped)
        for i in members:
            prep.encoded[i] = encode(tok, prep.prompts[i], responses[i], max_prompt_len=cfg.max_prompt_len,
                                     max_len=cfg.max_len, template=resolve_template(cfg.template, tok))
    lengths = [len(prep.encoded[i].input_ids) for i in members]
    fid = FidelityAccumulator()
    norm = NormStats(embed)
    specs = shard_specs(settings, codec)
    mode = settings["storage"].get("positions", "targets")
    wanted = {i: stored_positions(prep.encoded[i], mode) for i in members}
    sizes = {TOKENS: sum(lengths), POSITIONS: sum(len(p) for p in wanted.values())}
    if overlap is None:
        overlap = getattr(getattr(tf, "device", None), "type", "cpu") != "cpu"
    teacher_dtype = DTYPE_BY_NAME[settings["teacher"]["dtype"]]

    per_position = {k: v for k, v in specs.items() if v[0] == POSITIONS}

    def store(rows: list[int], pending: PendingRecords) -> None:
        recs = pending.wait()
        if not pending.finite:
            check_finite(rows, recs, prep)
        batch = to_arrays(pending.whole, per_position, codec)  # the batch's arrays at once, then cut per example
        lo = 0
        at_targets: list[tuple[list[int], list[int]]] = []
        hidden_at: list[torch.Tensor] = []
        for i, rec in zip(rows, recs):
            enc = prep.encoded[i]
            m = len(rec["positions"])
            arrays = {k: v[lo:lo + m] for k, v in batch.items()}
            arrays["input_ids"] = np.asarray(enc.input_ids, dtype=specs["input_ids"][1])
            lo += m
            if "logits" in rec:
                stored = codec.decode({k: arrays[k] for k in codec.array_specs()}) if codec is not None else None
                res = reconstruction_check(rec["logits"], rec["hidden"], stored, weight, bias, dtype=teacher_dtype)
                if stored is not None and cfg.top_k and codec is not None and codec.name not in LOSSLESS_HIDDEN:
                    from ..cache.head import kl_stats

                    asm = assemble_logits(reconstruct_logits(stored, weight, bias), rec["topk_values"],
                                          rec["topk_indices"], rec["logsumexp"])
                    res["assembled_t1"] = kl_stats(rec["logits"], asm, 1.0)
                    res["assembled_t2"] = kl_stats(rec["logits"], asm, 2.0)
                fid.add(res)
            targets = enc.targets()
            at_targets.append((enc.input_ids, targets))
            if mode != "targets":
                hidden_at.append(rec["hidden"][rows_at(rec, torch.as_tensor(targets, dtype=torch.long))])
            ex = prep.examples[i]
            w.add({"order": i, "id": ex.id, "instruction": ex.instruction, "input": ex.input,
                   "prompt": prep.prompts[i], "response": responses[i], "source": ex.source,
                   "messages": json.dumps([list(m) for m in ex.messages], ensure_ascii=False) if ex.messages else "",
                   "prompt_len": enc.prompt_len, "n_tokens": len(enc.input_ids),
                   "n_positions": len(rec["positions"])}, arrays)
            if pbar is not None:
                pbar.update(len(enc.input_ids))
        # stored at the targets only (format 2's default), the batch's rows are the targets' rows: no copy
        norm.add(at_targets, pending.whole["hidden"] if mode == "targets" else torch.cat(hidden_at))

    with ShardWriter(out / SHARDS / shard_name(s), specs, compression_level=cfg.compression_level, rows=sizes) as w:
        with StoreThread(depth=2 if overlap else 0) as storing:
            for batch in length_batches(lengths, cfg.batch_tokens):
                rows = [members[j] for j in batch]
                pending = tf.launch([prep.encoded[i].input_ids for i in rows], positions=[wanted[i] for i in rows],
                                    keep_logits=[j < cfg.fidelity_sample for j in batch])
                storing.submit(lambda rows=rows, pending=pending: store(rows, pending))
        w.extra_meta["fidelity"] = fid.result()
        w.extra_meta["norm_sums"] = norm.sums


def generate_shard(teacher: Teacher, tok: Any, cfg: CacheConfig, prep: Prepared, members: list[int], *,
                   seed: int) -> dict[int, str]:
    """The teacher's sampled response text for each example of a shard (SeqKD)."""
    from ..generation import SamplingSettings

    settings = SamplingSettings(cfg.gen_max_new_tokens, cfg.gen_temperature, cfg.gen_top_p)
    torch.manual_seed(seed)
    out: dict[int, str] = {}
    order = sorted(members, key=lambda i: (-prep.encoded[i].prompt_len, i))
    for b in range(0, len(order), cfg.gen_batch_size):
        rows = order[b:b + cfg.gen_batch_size]
        prompts = [prep.encoded[i].input_ids[:prep.encoded[i].prompt_len] for i in rows]
        caps = [min(cfg.gen_max_new_tokens, cfg.max_len - 1 - len(p)) for p in prompts]
        new = teacher.generate(prompts, settings=settings, max_new=caps)
        for i, ids in zip(rows, new):
            out[i] = tok.decode(ids, skip_special_tokens=True).strip()
    return out


def decide_logits_source(settings: dict[str, Any], fidelity: dict[str, Any]) -> tuple[str, bool]:
    """(source of full teacher logits, whether h @ W.T reproduces the teacher's logits)."""
    reconstructable = head_reproduces_logits(fidelity.get("exact_t1", {}), settings["teacher"]["dtype"])
    mode, k = settings["storage"]["hidden"], settings["storage"]["top_k"]
    if reconstructable and mode in LOSSLESS_HIDDEN:
        return "hidden", True
    if reconstructable and mode == "compact" and k:
        return "assembled", True
    if k:
        return "topk", reconstructable
    raise DskdError("this cache would hold no usable teacher distribution (no exact hidden states and no top-k)",
                    hint="use --top-k > 0 or a lossless --hidden mode")


def finalize(out: Path, *, full_verify: bool = False) -> dict[str, Any]:
    """Index every shard and write the manifest (the cache's commit point)."""
    settings = read_json(out / SETTINGS)
    n = settings["num_shards"]
    missing = [shard_name(s) for s in range(n) if not shard_done(out, s)]
    if missing:
        raise DskdError(f"cache {out}: {len(missing)} of {n} shards are not written yet: {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""),
                        hint="run cache-teacher for the missing --shard-index values (or again without it)")
    problems: list[str] = []
    shards, fid, norms = [], FidelityAccumulator(), []
    for s in range(n):
        sdir = out / SHARDS / shard_name(s)
        if full_verify:
            problems += verify_shard(sdir, None)
        meta = read_json(sdir / SHARD_META)
        shards.append({"name": shard_name(s), "examples": meta["examples"], "tokens": meta["tokens"],
                       "positions": meta["positions"],
                       "bytes": dir_bytes(sdir), "meta_sha256": sha256_file(sdir / SHARD_META)})
        fid.merge(meta.get("fidelity", {}))
        if "norm_sums" in meta:
            norms.append(meta["norm_sums"])
    if problems:
        raise DskdError(problems, hint="delete the bad shard folders and re-run cache-teacher")
    total = sum(s["examples"] for s in shards)
    if total != settings["num_examples"]:
        raise DskdError(f"cache {out}: shards hold {total} examples, settings say {settings['num_examples']}")
    fidelity = fid.result()
    source, reconstructable = decide_logits_source(settings, fidelity)
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": settings_fingerprint(settings),
        "settings": settings,
        "shards": shards,
        "totals": {"examples": total, "tokens": sum(s["tokens"] for s in shards),
                   "positions": sum(s["positions"] for s in shards),
                   "bytes": sum(s["bytes"] for s in shards)},
        "fidelity": fidelity,
        "logits_reconstructable": reconstructable,
        "logits_source": source,
        "norm_stats": NormStats.merge(norms) if len(norms) == n else None,
        "teacher_files": {rel: sha for rel, (_size, sha) in file_table(out / TEACHER).items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if not reconstructable:
        log.warning("the teacher's logits are not h @ W.T (head bias, soft-capping or scaling): distillation will use "
                    "the stored top-k logits as the source of truth")
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def run(cfg: CacheConfig, *, progress: bool = True) -> Path:
    """Write (or resume, or extend with this machine's shards) the cache at ``cfg.out``."""
    ctx = DistContext.from_env()
    try:
        out = _run(cfg, ctx, progress)
        if cfg.student_tokenizer and ctx.is_main and (out / MANIFEST).exists():
            from ..cache.align import run as align

            align(AlignConfig(cache=str(out), student_tokenizer=cfg.student_tokenizer))
        return out
    finally:
        ctx.close()


def _run(cfg: CacheConfig, ctx: DistContext, progress: bool) -> Path:
    from ..locks import folder_lock, is_lock_file

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise DskdError(f"--out {out} exists and is a file")
    if out.is_dir() and any(not is_lock_file(p) for p in out.iterdir()) and not (out / SETTINGS).exists():
        raise DskdError(f"--out {out} exists, is not empty and is not a dskd-batch cache", hint="choose another folder")
    # one writer per (machine share, rank): a second identical command stops here, before it touches anything
    with folder_lock(out, f"cache-{cfg.shard_index}of{cfg.num_shards}-rank{ctx.rank}of{ctx.world_size}", "cache"):
        try:
            return _run_locked(cfg, ctx, progress, out)
        except Exception as e:  # noqa: BLE001 - a full disk becomes one clear error; anything else goes on
            full = disk_full_error(e, out, cfg)
            if full is None:
                raise
            raise full from e


def disk_full_error(e: BaseException, out: Path, cfg: CacheConfig) -> DskdError | None:
    """One clear error for "no space left on device" (an OSError, or safetensors' own error), with
    roughly how much space the shards still to write need. The shard being written was removed."""
    import errno

    if not ((isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)):
        return None
    need = ""
    try:
        settings = read_json(out / SETTINGS)
        n = settings["num_shards"]
        left = sum(not shard_done(out, s) for s in range(n))
        done = [out / SHARDS / shard_name(s) for s in range(n) if shard_done(out, s)]
        per_shard = (sum(dir_bytes(d) for d in done) / len(done)) if done else None
        if per_shard is None:
            d = int(settings["teacher"]["hidden_size"])
            per_value = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "compact": 0.75, "none": 0.0}[cfg.hidden]
            per_token = d * per_value + cfg.top_k * 8 + 12
            per_shard = per_token * cfg.max_len * cfg.shard_size * 0.5
        need = f"; the {left} shard(s) still to write need roughly {left * per_shard / 2**20:,.0f} MiB more"
    except Exception:  # noqa: BLE001 - the estimate is a courtesy
        pass
    return DskdError(f"no space left on the device holding {out}{need}",
                     hint="free space (or choose an --out on a larger disk) and run the same command again: "
                          "finished shards are kept and the cache resumes")


def check_finite(rows: list[int], recs: list[dict[str, Any]], prep: Prepared) -> None:
    """Refuse to store a teacher output that is NaN or infinite, naming the examples and the first
    bad token position of each."""
    bad = []
    for i, rec in zip(rows, recs):
        for key in ("hidden", "logsumexp", "topk_values", "logits"):
            t = rec.get(key)
            if t is None or bool(torch.isfinite(t).all()):
                continue
            flat = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(-1)
            pos = int(rec["positions"][int(flat.nonzero()[0, 0])])
            bad.append(f"example {prep.examples[i].id} ({prep.examples[i].source}): the teacher's {key} is not finite "
                       f"from token position {pos} of {len(prep.encoded[i].input_ids)} "
                       f"({int(flat.sum())} position(s))")
            break
    if bad:
        raise DskdError(["the teacher produced NaN or infinite values; nothing of this shard was stored:"] + bad[:8]
                        + ([f"... and {len(bad) - 8} more example(s)"] if len(bad) > 8 else []),
                        hint="check the teacher's weights; in fp16 activations can overflow: try --dtype bf16 or fp32")


def resolved_template_config(cfg: CacheConfig, tok: Any, students: list[Any]) -> CacheConfig:
    """``cfg`` with `--template auto` made concrete: the chat template only if the teacher's and every
    student tokenizer that renders these rows have one, else alpaca."""
    if cfg.template != "auto":
        return cfg
    chat = all(getattr(t, "chat_template", None) for t in [tok, *students])
    return dataclasses.replace(cfg, template="chat" if chat else "alpaca")


def _manifest_readable(out: Path) -> bool:
    try:
        m = read_json(out / MANIFEST)
        return isinstance(m, dict) and "shards" in m and "settings" in m
    except (OSError, ValueError):
        return False


def _run_locked(cfg: CacheConfig, ctx: DistContext, progress: bool, out: Path) -> Path:
    device = resolve_device(cfg.device)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    teacher = open_teacher(cfg.teacher, top_k=cfg.top_k, dtype=cfg.dtype, device=device)  # its model loads when first used
    tok = teacher.tokenizer
    students = [load_tokenizer(st) for st in cfg.student_tokenizer]  # a bad one fails now, not after the teacher ran
    cfg = resolved_template_config(cfg, tok, students)
    prep = prepare_corpus(cfg, tok)
    existing = read_json(out / SETTINGS) if (out / SETTINGS).exists() else None
    if existing is not None:
        diff = settings_diff(existing, build_settings(cfg, tok, prep, None),
                             only={"tokenizer", "data", "template", "limits", "storage", "generation", "num_examples",
                                   "num_shards"})
        diff = [d for d in diff if not d.startswith("storage.topk_index_dtype")]
        if diff:
            raise DskdError([f"{out} was built with different settings:"] + diff,
                            hint="write to a new --out folder, or run with the settings the cache was built with")
    settings = build_settings(cfg, tok, prep, teacher)
    if existing is not None:
        diff = settings_diff(existing, settings)
        if diff:
            raise DskdError([f"{out} was built with different settings:"] + diff,
                            hint="write to a new --out folder, or run with the teacher the cache was built with")
        if (out / MANIFEST).exists():
            if _manifest_readable(out):
                log.info("cache %s is already complete (%d examples); nothing to do", out, settings["num_examples"])
                return out
            if ctx.is_main and all(shard_done(out, s) for s in range(settings["num_shards"])):
                log.warning("%s is unreadable: rebuilding it from the finished shards (re-hashing them)", out / MANIFEST)
                finalize(out, full_verify=True)
                return out
    tf = teacher
    head = teacher.head_and_embeddings()
    weight, bias = head["lm_head.weight"], head.get("lm_head.bias")
    if ctx.is_main or cfg.num_shards > 1:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / SETTINGS).exists():
            atomic_write_json(out / SETTINGS, settings)
        if not (out / TEACHER).exists():
            codec_state = None
            if cfg.hidden == "compact":
                log.info("calibrating the compact hidden-state codec on %d positions", CALIBRATION_TOKENS)
                codec_state = calibrate_compact(tf, prep, weight, cfg.batch_tokens).state_dict()
            _write_teacher_dir(out, teacher, head, codec_state)
    ctx.barrier()
    codec = load_codec(out, settings)
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    worker = cfg.shard_index * ctx.world_size + ctx.rank
    workers = cfg.num_shards * ctx.world_size
    mine = [s for s in range(settings["num_shards"]) if s % workers == worker]
    for p in (out / SHARDS).iterdir():  # leftovers of this worker's killed runs
        if TMP_MARK in p.name and any(p.name.startswith(shard_name(s) + TMP_MARK) for s in mine):
            shutil.rmtree(p, ignore_errors=True)
    todo = [s for s in mine if not shard_done(out, s)]
    if len(todo) < len(mine):
        log.info("resuming: %d of this worker's %d shards are already written", len(mine) - len(todo), len(mine))
    tokens = sum(len(prep.encoded[i].input_ids) for s in todo
                 for i in range(s * cfg.shard_size, min(len(prep.examples), (s + 1) * cfg.shard_size)))
    pbar = None
    if progress and ctx.is_main and tokens:
        from tqdm import tqdm

        pbar = tqdm(total=tokens, unit="tok", unit_scale=True, desc="cache-teacher", dynamic_ncols=True)
    try:
        for s in todo:
            write_shard(out, s, cfg, settings, prep, tf, codec, weight, bias, pbar, tok,
                        embed=head.get("embed_tokens.weight", weight))
    finally:
        if pbar is not None:
            pbar.close()
        tf.close()
    ctx.barrier()
    if ctx.is_main:
        n = settings["num_shards"]
        done = sum(shard_done(out, s) for s in range(n))
        if done == n:
            finalize(out)
            log.info("cache complete: %s (%d examples)", out, settings["num_examples"])
        else:
            log.info("%d of %d shards written; the cache is complete once the other machines finish "
                     "(the last one writes the manifest) or after `dskd-batch merge %s`", done, n, out)
    return out

"""Writing is atomic and resumable, refuses mismatching settings, and corruption is caught and named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import assert_same_cache, cache_config
from dskd_batch import open_cache
from dskd_batch.cache import writer as writer_mod
from dskd_batch.teacher.caching import run
from dskd_batch.cli import main
from dskd_batch.config import CacheConfig
from dskd_batch.errors import CacheCorruptError, DskdError


def cfg(teacher: Path, corpus: Path, out: Path, **kw) -> CacheConfig:
    return cache_config(teacher, corpus, out, **{**dict(hidden="fp16", batch_tokens=300, shard_size=4, max_len=64,
                                                        max_prompt_len=40), **kw})


@pytest.fixture(scope="module")
def reference_cache(llama_teacher: Path, corpus: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "cache"
    run(cfg(llama_teacher, corpus, out), progress=False)
    return out


def test_layout_and_manifest(reference_cache: Path) -> None:
    m = json.loads((reference_cache / "manifest.json").read_text())
    assert m["format_version"] == 2 and len(m["shards"]) == 4  # 13 examples / 4 per shard
    assert sum(s["examples"] for s in m["shards"]) == 13
    for key in ("teacher", "tokenizer", "data", "template", "limits", "storage"):
        assert key in m["settings"]
    assert not list(reference_cache.rglob("*.tmp-*"))
    c = open_cache(reference_cache)
    from dskd_batch.data import load_examples

    corpus = Path(json.loads((reference_cache / "settings.json").read_text())["data"]["source"])
    assert [c[i]["id"] for i in range(len(c))] == [ex.id for ex in load_examples(corpus).examples]  # corpus order
    assert c[-1]["id"] == c[len(c) - 1]["id"]
    with pytest.raises(IndexError):
        c[len(c)]


def test_killed_run_resumes_to_identical_cache(llama_teacher, corpus, reference_cache, tmp_path, monkeypatch) -> None:
    out = tmp_path / "cache"
    real_exit = writer_mod.ShardWriter.__exit__
    calls = {"n": 0}

    def dying_exit(self, exc_type, exc, tb):
        calls["n"] += 1
        if calls["n"] == 3:  # die while committing the third shard
            raise KeyboardInterrupt
        return real_exit(self, exc_type, exc, tb)

    monkeypatch.setattr(writer_mod.ShardWriter, "__exit__", dying_exit)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(llama_teacher, corpus, out), progress=False)
    monkeypatch.setattr(writer_mod.ShardWriter, "__exit__", real_exit)
    assert not (out / "manifest.json").exists()
    assert len(list((out / "shards").glob("shard.?????"))) == 2
    with pytest.raises(DskdError, match="incomplete: 2 of 4 shards"):
        open_cache(out)
    written = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("shard.?????")}
    run(cfg(llama_teacher, corpus, out), progress=False)
    for name, mtime in written.items():  # finished shards were not rewritten
        assert (out / "shards" / name).stat().st_mtime_ns == mtime
    assert not list(out.rglob("*.tmp-*"))
    assert_same_cache(out, reference_cache)


def test_rerun_of_complete_cache_is_a_no_op(llama_teacher, corpus, reference_cache, tmp_path) -> None:
    out = tmp_path / "c"
    shutil.copytree(reference_cache, out)
    before = (out / "manifest.json").read_bytes()
    run(cfg(llama_teacher, corpus, out), progress=False)
    assert (out / "manifest.json").read_bytes() == before


def test_refuses_different_settings(llama_teacher, gpt2_teacher, corpus, reference_cache, tmp_path) -> None:
    out = tmp_path / "c"
    shutil.copytree(reference_cache, out)
    with pytest.raises(DskdError) as e:
        run(cfg(llama_teacher, corpus, out, top_k=4, max_len=60), progress=False)
    text = str(e.value)
    assert "storage.top_k: cache has 8, this run has 4" in text and "limits.max_len" in text
    with pytest.raises(DskdError, match="teacher.fingerprint"):
        run(cfg(gpt2_teacher, corpus, out), progress=False)
    with pytest.raises(DskdError, match="data.fingerprint"):
        run(cfg(llama_teacher, corpus, out, limit=5), progress=False)
    assert_same_cache(out, reference_cache)  # nothing was touched


def test_corrupt_or_missing_shard_is_named(reference_cache, tmp_path) -> None:
    out = tmp_path / "c"
    shutil.copytree(reference_cache, out)
    chunk = sorted((out / "shards/shard.00001/positions/hidden/c").rglob("*"))[-1]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="shard shard.00001: file positions/hidden/c/.* sha256"):
        open_cache(out).verify()
    c = open_cache(out)
    c[0]  # shard 0 is fine
    with pytest.raises(CacheCorruptError, match="shard.00001"):
        c[5]
    res = CliRunner().invoke(main, ["verify", str(out)])
    assert res.exit_code == 2 and "shard.00001" in res.output
    shutil.rmtree(out / "shards/shard.00002")
    with pytest.raises(CacheCorruptError, match="missing: shard.00002"):
        open_cache(out)


def test_cli_cache_info_and_verify(reference_cache) -> None:
    r = CliRunner().invoke(main, ["verify", str(reference_cache)])
    assert r.exit_code == 0, r.output
    assert "4 shards, 13 examples" in r.output
    r = CliRunner().invoke(main, ["cache-info", str(reference_cache), "--json"])
    info = json.loads(r.output)
    assert info["examples"] == 13 and info["storage"]["hidden"] == "fp16"
    bpt = info["bytes_per_token"]
    assert set(bpt) >= {"hidden", "topk_values", "topk_indices", "logsumexp", "argmax", "input_ids", "total"}
    assert 0 < bpt["hidden"] < 2 * 32 * 1.2  # fp16, d=32, compressed
    r = CliRunner().invoke(main, ["cache-info", str(reference_cache)])
    assert "bytes/token" in r.output and "fidelity" in r.output


def test_cli_errors_are_one_clear_line(llama_teacher, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    r = CliRunner().invoke(main, ["cache-teacher", "--teacher", str(llama_teacher), "--data", str(bad),
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert f"{bad}:2: malformed JSON" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(main, ["cache-teacher", "--teacher", str(tmp_path / "nope"), "--data", str(bad),
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "model not found" in r.output
    r = CliRunner().invoke(main, ["cache-info", str(tmp_path)])
    assert r.exit_code == 2 and "not a dskd-batch cache" in r.output


@pytest.mark.parametrize("mode", ["bf16", "none", "compact"])
def test_storage_modes(mode, llama_teacher, corpus, tmp_path) -> None:
    out = tmp_path / mode
    run(cfg(llama_teacher, corpus, out, hidden=mode, shard_size=20), progress=False)
    c = open_cache(out, verify="full")
    rec = c[3]
    if mode == "none":
        assert rec["hidden"] is None and c.logits_source == "topk"
        return
    assert rec["hidden"].shape == (len(rec["positions"]), 32)
    fid = c.manifest["fidelity"]
    if mode == "bf16":
        assert fid["stored_t1"]["kl_mean"] < 1e-3 and c.logits_source == "hidden"
    else:
        assert c.logits_source == "assembled"
        assert (out / "shards/shard.00000/positions/hidden_packed").exists()
        assert c.codec.nbytes + 2 <= 0.75 * 32
        assert fid["assembled_t1"]["top1_agreement"] == 1.0
        assert fid["stored_t1"]["kl_mean"] < 1e-3  # a codec fitted on too few positions would be far off


def test_compact_codec_round_trip_is_deterministic() -> None:
    from dskd_batch.cache.codecs import CompactCodec

    g = torch.Generator().manual_seed(0)
    d, V = 16, 50
    h = torch.randn(400, d, generator=g) * torch.linspace(0.1, 5, d)
    W = torch.randn(V, d, generator=g)
    p, idx = torch.topk(torch.softmax(h @ W.T, -1), 16, -1)
    codec = CompactCodec.fit(h, W, idx, p)
    enc = codec.encode(h)
    assert enc["hidden_packed"].shape == (400, codec.nbytes) and codec.nbytes + 2 <= 0.75 * d
    dec = codec.decode(enc)
    again = CompactCodec.from_state(codec.state_dict()).decode({k: v.copy() for k, v in enc.items()})
    assert torch.equal(dec, again)
    rel = float(((dec - h).norm() / h.norm()))
    assert rel < 0.1, rel


def test_format_1_cache_is_refused_with_what_to_run(reference_cache, tmp_path) -> None:
    out = tmp_path / "old"
    shutil.copytree(reference_cache, out)
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = 1
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DskdError, match="cache format 1 is not supported") as e:
        open_cache(out)
    assert "cache-teacher" in str(e.value)
    r = CliRunner().invoke(main, ["cache-info", str(out)])
    assert r.exit_code != 0 and "format 1" in r.output


def test_all_positions_hold_the_targets_rows_and_train_the_same(llama_teacher, corpus, reference_cache,
                                                                tmp_path) -> None:
    """``positions="all"`` (format 1's layout) stores a superset; what training reads is identical."""
    from dskd_batch.train.batches import collate
    from dskd_batch.cache.info import cache_summary

    out = tmp_path / "all"
    run(cfg(llama_teacher, corpus, out, positions="all"), progress=False)
    full, tgt = open_cache(out), open_cache(reference_cache)
    assert full.fingerprint != tgt.fingerprint  # a different cache: never mixed up
    for i in (0, 5, 12):
        a, b = full[i], tgt[i]
        assert a["positions"].tolist() == list(range(len(a["input_ids"])))
        assert set(b["positions"].tolist()) < set(a["positions"].tolist())
    mb_all, mb_tgt = collate([full[i] for i in range(4)], 1, True), collate([tgt[i] for i in range(4)], 1, True)
    assert torch.equal(mb_all.targets, mb_tgt.targets) and torch.equal(mb_all.select, mb_tgt.select)
    for k in ("hidden", "topk_values", "topk_indices", "logsumexp", "argmax"):
        torch.testing.assert_close(getattr(mb_all.teacher, k), getattr(mb_tgt.teacher, k), atol=2e-3, rtol=1e-3)
    sa, st = cache_summary(full), cache_summary(tgt)
    assert sa["positions"] == sa["tokens"] and st["positions"] < st["tokens"]
    assert st["bytes_per_example"] < sa["bytes_per_example"]
    for name in ("logsumexp", "argmax", "topk_values", "topk_indices", "hidden"):  # every per-position array shrinks
        assert st["bytes_per_token"][name] < sa["bytes_per_token"][name]


def test_one_record_spec() -> None:
    """TeacherBatch holds exactly the teacher fields of the column spec, and a record's stored rows
    are found by position (a missing one is named)."""
    from dataclasses import fields

    from dskd_batch.cache.records import TEACHER_FIELDS, TeacherBatch, rows_at

    assert tuple(f.name for f in fields(TeacherBatch)) == TEACHER_FIELDS
    rec = {"id": "x", "positions": torch.tensor([2, 3, 4, 7])}
    assert rows_at(rec, torch.tensor([2, 3, 4, 7])) == slice(None)
    assert rows_at(rec, torch.tensor([3, 7])).tolist() == [1, 3]
    with pytest.raises(ValueError, match=r"example x: the teacher's outputs at positions \[5\] are not stored"):
        rows_at(rec, torch.tensor([4, 5]))
    with pytest.raises(ValueError, match=r"positions \[1\]"):
        rows_at({"id": "x", "positions": torch.tensor([], dtype=torch.long)}, torch.tensor([1]))

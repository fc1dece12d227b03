"""What a careful user runs into: two writers on one folder, NaN teachers and losses, a full disk,
non-UTF-8 corpora, a broken manifest, unchecked corruption in cache-info, duplicated metrics and
leftover folders after a resume. Each test reproduces the failure first reported from outside."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import assert_same_cache, cache_config, subprocess_env
from dskd_batch import open_cache
from dskd_batch.teacher.caching import run as cache_run
from dskd_batch.cli import main
from dskd_batch.config import CacheConfig, DistillConfig
from dskd_batch.train.distill import run as distill_run
from dskd_batch.errors import DskdError

ARGS = ["--hidden", "fp32", "--top-k", "8", "--batch-tokens", "300", "--shard-size", "2", "--max-len", "64",
        "--max-prompt-len", "40"]


def _env() -> dict[str, str]:
    return subprocess_env()


def cache_cfg(teacher: Path, corpus: Path, out: Path, **kw) -> CacheConfig:
    return cache_config(teacher, corpus, out, **{**dict(batch_tokens=300, shard_size=2, max_len=64, max_prompt_len=40),
                                                  **kw})


@pytest.fixture(scope="module")
def ref_cache(llama_teacher, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "cache"
    cache_run(cache_cfg(llama_teacher, corpus, out), progress=False)
    return out


def _wait_for_lock(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        locks = list(out.glob(".lock-cache-*")) if out.exists() else []
        if locks and locks[0].read_text().startswith("pid"):
            return
        time.sleep(0.005)
    raise AssertionError("the first writer never took its lock")


@pytest.mark.slow
def test_second_writer_on_the_same_cache_is_refused(llama_teacher, corpus, tmp_path) -> None:
    big = tmp_path / "big.jsonl"
    big.write_text(corpus.read_text() * 20)  # 260 examples, 130 shards: the first writer is busy for a while
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "dskd_batch", "cache-teacher", "--teacher", str(llama_teacher), "--data", str(big),
           "--out", str(out), *ARGS]
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lock(out, first)
    second = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the first writer finished before the second started: make the corpus bigger"
    assert second.returncode == 2, second.stderr
    assert "is being written by another process: pid" in second.stderr and str(first.pid) in second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()
    ref = tmp_path / "ref"
    assert subprocess.run([*cmd[:-len(ARGS) - 2], "--out", str(ref), *ARGS], env=_env(),
                          capture_output=True).returncode == 0
    assert_same_cache(out, ref)

    # a killed writer leaves no lock that blocks the resume
    out2 = tmp_path / "killed"
    killed = subprocess.Popen([*cmd[:-len(ARGS) - 2], "--out", str(out2), *ARGS], env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_lock(out2, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    r = subprocess.run([*cmd[:-len(ARGS) - 2], "--out", str(out2), *ARGS], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert_same_cache(out2, ref)


def test_lock_refuses_a_second_holder_and_is_released(tmp_path) -> None:
    from dskd_batch.locks import folder_lock

    with folder_lock(tmp_path, "x", "cache"):
        with pytest.raises(DskdError, match=rf"cache {tmp_path} is being written by another process: pid {os.getpid()}"):
            with folder_lock(tmp_path, "x", "cache"):
                pass
        with folder_lock(tmp_path, "y", "cache"):  # another name (another machine's shards) is independent
            pass
    with folder_lock(tmp_path, "x", "cache"):  # released
        pass


def test_second_distill_on_the_same_run_folder_is_refused(ref_cache, gpt2_student, tmp_path) -> None:
    from dskd_batch.locks import folder_lock

    out = tmp_path / "run"
    cfg = DistillConfig(student=str(gpt2_student), out=str(out), cache=str(ref_cache), method="kd", max_steps=1,
                        batch_size=2, device="cpu")
    with folder_lock(out, "distill-rank0of1", "run folder"):  # as another `distill` on this folder would
        with pytest.raises(DskdError, match="run folder .* is being written by another process"):
            distill_run(cfg)
    distill_run(cfg)  # the folder holding only the released lock is a fresh run folder


def test_align_takes_the_cache_lock(ref_cache, tmp_path) -> None:
    from dskd_batch.cache.align import run as align_run
    from dskd_batch.config import AlignConfig
    from dskd_batch.locks import folder_lock

    with folder_lock(ref_cache, "align", "the alignments of cache"):
        with pytest.raises(DskdError, match="being written by another process"):
            align_run(AlignConfig(cache=str(ref_cache), student_tokenizer=(str(ref_cache / "teacher" / "tokenizer"),)))


def test_nan_teacher_is_refused_and_nothing_is_stored(llama_teacher, corpus, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(llama_teacher))
    tok = AutoTokenizer.from_pretrained(str(llama_teacher))
    bad_id = tok("Rome", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        m.get_input_embeddings().weight[bad_id] = float("nan")
    bad = tmp_path / "nan-teacher"
    m.save_pretrained(str(bad))
    tok.save_pretrained(str(bad))
    out = tmp_path / "cache"
    with pytest.raises(DskdError, match=r"NaN or infinite.*\n.*example .*: the teacher's hidden is not finite from "
                                        r"token position \d+"):
        cache_run(cache_cfg(bad, corpus, out), progress=False)
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob("*.tmp-*"))
    # the shards before the bad example are kept; none holds a NaN
    for s in (out / "shards").glob("shard.*"):
        assert (s / "shard.json").exists()


def _nan_on_call(monkeypatch, n: int) -> None:
    from dskd_batch import methods

    calls = {"n": 0}
    orig = methods.VanillaKD.losses

    def losses(self, *a, **k):
        out = orig(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == n:
            out["objective"] = out["objective"] * float("nan")
        return out

    monkeypatch.setattr(methods.VanillaKD, "losses", losses)


def test_nonfinite_loss_stops_before_anything_is_written(ref_cache, gpt2_student, tmp_path, monkeypatch) -> None:
    _nan_on_call(monkeypatch, 3)
    out = tmp_path / "run"
    cfg = DistillConfig(student=str(gpt2_student), out=str(out), cache=str(ref_cache), method="kd", max_steps=4,
                        batch_size=2, device="cpu", save_steps=1)
    with pytest.raises(DskdError, match=r"step 3 \(epoch 1\): the loss is not finite; its global batch holds examples "
                                        r"[0-9a-f]{16}, [0-9a-f]{16}"):
        distill_run(cfg)
    assert not (out / "student").exists()
    cks = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in cks] == ["step-0000001", "step-0000002"]
    from safetensors.torch import load_file

    for c in cks:
        assert all(torch.isfinite(v).all() for v in load_file(str(c / "student" / "model.safetensors")).values())


def test_skip_nonfinite_skips_and_counts(ref_cache, gpt2_student, tmp_path, monkeypatch) -> None:
    _nan_on_call(monkeypatch, 2)
    out = tmp_path / "run"
    distill_run(DistillConfig(student=str(gpt2_student), out=str(out), cache=str(ref_cache), method="kd", max_steps=3,
                              batch_size=2, device="cpu", skip_nonfinite=True))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps", 0) for r in lines] == [0, 1, 1]
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(str(out / "student" / "model.safetensors")).values())


def test_full_disk_is_one_clear_error_and_resumes(llama_teacher, corpus, ref_cache, tmp_path, monkeypatch) -> None:
    from dskd_batch.cache import writer as writer_mod

    out = tmp_path / "cache"
    orig = writer_mod.ShardWriter.add
    state = {"rows": 0}

    def add(self, row, arrays):
        state["rows"] += 1
        if state["rows"] == 5:  # inside the third shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(self, row, arrays)

    monkeypatch.setattr(writer_mod.ShardWriter, "add", add)
    with pytest.raises(DskdError, match=rf"no space left on the device holding {out}; the 5 shard\(s\) still to write "
                                        r"need roughly [\d,]+ MiB more"):
        cache_run(cache_cfg(llama_teacher, corpus, out), progress=False)
    assert not list(out.rglob("*.tmp-*")) and not (out / "manifest.json").exists()
    assert len(list((out / "shards").glob("shard.?????"))) == 2
    monkeypatch.undo()
    cache_run(cache_cfg(llama_teacher, corpus, out), progress=False)
    assert_same_cache(out, ref_cache)


def test_non_utf8_corpus_names_file_and_line(tmp_path) -> None:
    from dskd_batch.data import load_examples

    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n'
                  b'{"prompt": "caf\xe9", "response": "e"}\n')
    with pytest.raises(DskdError, match=rf"{p}:3: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_examples(p)
    assert len(load_examples(p, skip_bad_rows=True).examples) == 2


def a_chunk(shard: Path) -> Path:
    return next(p for p in sorted((shard / "tokens").rglob("*")) if p.is_file() and "/c/" in p.as_posix())


def test_rerun_over_a_broken_manifest_rebuilds_it(llama_teacher, corpus, ref_cache, tmp_path) -> None:
    out = tmp_path / "cache"
    shutil.copytree(ref_cache, out)
    good = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text('{"format_version": 1, "shards": [')
    cache_run(cache_cfg(llama_teacher, corpus, out), progress=False)
    fixed = json.loads((out / "manifest.json").read_text())
    assert fixed["shards"] == good["shards"] and fixed["fingerprint"] == good["fingerprint"]
    open_cache(out, verify="full")
    # a broken manifest over a corrupt shard is not declared complete
    (out / "manifest.json").write_text("not json")
    arr = a_chunk(out / "shards" / "shard.00001")
    arr.write_bytes(arr.read_bytes()[:-1] + bytes([arr.read_bytes()[-1] ^ 0xFF]))
    with pytest.raises(DskdError, match="shard.00001.*sha256"):
        cache_run(cache_cfg(llama_teacher, corpus, out), progress=False)


def test_cache_info_says_what_it_checked(ref_cache, tmp_path) -> None:
    r = CliRunner().invoke(main, ["cache-info", str(ref_cache)])
    assert r.exit_code == 0 and "check        ok (file presence and sizes checked, contents not hashed" in r.output
    r = CliRunner().invoke(main, ["cache-info", str(ref_cache), "--verify"])
    assert r.exit_code == 0 and "check        ok (checksums of every file re-hashed)" in r.output
    bad = tmp_path / "c"
    shutil.copytree(ref_cache, bad)
    chunk = a_chunk(bad / "shards" / "shard.00002")
    chunk.unlink()
    idx = bad / "shards" / "shard.00003" / "index.parquet"
    idx.write_bytes(idx.read_bytes()[:-10])
    r = CliRunner().invoke(main, ["cache-info", str(bad)])
    assert r.exit_code == 2
    assert "check        FAILED" in r.output and "shard.00002: file tokens/" in r.output and "is missing" in r.output
    assert "shard.00003: file index.parquet has" in r.output
    corrupt = tmp_path / "d"
    shutil.copytree(ref_cache, corrupt)
    chunk = a_chunk(corrupt / "shards" / "shard.00002")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert CliRunner().invoke(main, ["cache-info", str(corrupt)]).exit_code == 0  # sizes alone cannot see it
    r = CliRunner().invoke(main, ["cache-info", str(corrupt), "--verify"])
    assert r.exit_code == 2 and "does not match its sha256" in r.output


def test_resume_logs_each_step_once_and_clears_leftovers(ref_cache, gpt2_student, tmp_path) -> None:
    out = tmp_path / "run"
    cfg = DistillConfig(student=str(gpt2_student), out=str(out), cache=str(ref_cache), method="kd", max_steps=5,
                        batch_size=2, device="cpu", save_steps=2)

    class Stop(Exception):
        pass

    def stop(step: int) -> None:
        if step == 3:  # logged steps 1-3, last checkpoint at 2
            raise Stop

    with pytest.raises(Stop):
        distill_run(cfg, on_step=stop)
    (out / "student.tmp-123-abc").mkdir()  # as a kill while writing the final student leaves it
    (out / "best.tmp-123-abc").mkdir()
    import dataclasses

    distill_run(dataclasses.replace(cfg, resume=True))
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert not list(out.glob("*.tmp-*"))

"""Past one process: torchrun ranks and --shard-index machines write disjoint shards whose merged cache
equals a single-process run; a run killed with SIGKILL resumes to the same cache."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import assert_same_cache, subprocess_env
from dskd_batch.teacher.caching import run
from dskd_batch.cli import main
from dskd_batch.config import CacheConfig
from dskd_batch.errors import DskdError

ARGS = ["--hidden", "fp32", "--top-k", "8", "--batch-tokens", "300", "--shard-size", "3", "--max-len", "64",
        "--max-prompt-len", "40"]


def _env() -> dict[str, str]:
    return subprocess_env()


@pytest.fixture(scope="module")
def single(llama_teacher: Path, corpus: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "cache"
    r = CliRunner().invoke(main, ["cache-teacher", "--teacher", str(llama_teacher), "--data", str(corpus),
                                  "--out", str(out), *ARGS])
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.slow
def test_torchrun_two_ranks_equals_single_process(llama_teacher, corpus, single, tmp_path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "dskd_batch", "cache-teacher", "--teacher", str(llama_teacher), "--data", str(corpus),
           "--out", str(out), "--device", "cpu", *ARGS]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_same_cache(out, single)


def test_shard_index_machines_then_merge(llama_teacher, corpus, single, tmp_path) -> None:
    out = tmp_path / "multi"
    base = dict(teacher=str(llama_teacher), data=str(corpus), out=str(out), hidden="fp32", top_k=8,
                batch_tokens=300, shard_size=3, max_len=64, max_prompt_len=40, num_shards=3)
    run(CacheConfig(**base, shard_index=0), progress=False)
    run(CacheConfig(**base, shard_index=2), progress=False)
    assert not (out / "manifest.json").exists()
    r = CliRunner().invoke(main, ["merge", str(out)])
    assert r.exit_code == 2 and "shard.00001" in r.output  # machine 1 has not run yet
    run(CacheConfig(**base, shard_index=1), progress=False)  # the last machine writes the manifest itself
    assert (out / "manifest.json").exists()
    assert_same_cache(out, single)
    (out / "manifest.json").unlink()
    r = CliRunner().invoke(main, ["merge", str(out)])
    assert r.exit_code == 0, r.output
    assert_same_cache(out, single)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(llama_teacher, corpus, tmp_path) -> None:
    big = tmp_path / "big.jsonl"
    big.write_text(corpus.read_text() * 12)  # 156 examples, 52 shards: the kill lands mid-run
    args = ["--teacher", str(llama_teacher), "--data", str(big), *ARGS]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dskd_batch", "cache-teacher", "--out", str(out), *args],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "shards" / "shard.00003").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    r = CliRunner().invoke(main, ["cache-teacher", "--out", str(out), *args])
    assert r.exit_code == 0, r.output
    assert not list(out.rglob("*.tmp-*"))
    ref = tmp_path / "ref"
    assert CliRunner().invoke(main, ["cache-teacher", "--out", str(ref), *args]).exit_code == 0
    assert_same_cache(out, ref)


def test_merge_refuses_non_cache(tmp_path) -> None:
    (tmp_path / "stray.txt").write_text("not a cache")
    r = CliRunner().invoke(main, ["merge", str(tmp_path)])
    assert r.exit_code == 2 and f"{tmp_path} is not a dskd-batch cache" in r.output
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(DskdError, match="not a dskd-batch cache"):
        from dskd_batch.cache.reader import open_cache

        open_cache(tmp_path)

"""The teacher protocol: a new kind of teacher is one file. A teacher served over HTTP from this
process (the standard-library server of dskd_batch.teacher.http) caches exactly as the local one,
through the command line, and serves the live stage of distill too."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_same_cache

from dskd_batch.cli import main
from dskd_batch.errors import DskdError
from dskd_batch.teacher.http import serve
from dskd_batch.teacher.source import LocalTeacher, open_teacher

CACHE_ARGS = ["--hidden", "fp32", "--top-k", "8", "--shard-size", "5", "--batch-tokens", "512", "--max-len", "96",
              "--max-prompt-len", "64"]


@pytest.fixture()
def served(llama_teacher):
    server = serve(LocalTeacher(str(llama_teacher)))
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()


def test_a_cache_made_through_a_served_teacher_equals_the_local_one(llama_teacher, fp32_cache, corpus, served,
                                                                    tmp_path) -> None:
    out = tmp_path / "served"
    r = CliRunner().invoke(main, ["cache-teacher", "--teacher", served, "--data", str(corpus), "--out", str(out),
                                  *CACHE_ARGS], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert_same_cache(fp32_cache, out)  # every record, byte for byte
    local, remote = (json.loads((p / "settings.json").read_text()) for p in (fp32_cache, out))
    assert remote["teacher"].pop("source") == served and local["teacher"].pop("source") == str(llama_teacher)
    assert remote == local  # the same fingerprint, architecture, dtype, vocabulary, tokenizer
    for f in ("teacher/head.safetensors", "teacher/config.json"):
        assert (fp32_cache / f).read_bytes() == (out / f).read_bytes(), f
    assert json.loads((out / "teacher" / "tokenizer" / "tokenizer_config.json").read_text())


def test_a_dry_run_through_a_served_teacher_equals_the_local_one(llama_teacher, corpus, served, tmp_path) -> None:
    from dskd_batch.teacher.sizing import estimate
    from conftest import cache_config

    local = estimate(cache_config(llama_teacher, corpus, tmp_path / "a", dry_run=True))
    remote = estimate(cache_config(served, corpus, tmp_path / "b", dry_run=True))
    assert local.pop("teacher") == str(llama_teacher) and remote.pop("teacher") == served
    assert json.dumps(local, sort_keys=True, default=str) == json.dumps(remote, sort_keys=True, default=str)


def test_the_served_teacher_answers_like_the_local_one(llama_teacher, served) -> None:
    local, remote = LocalTeacher(str(llama_teacher), top_k=4), open_teacher(served, top_k=4)
    assert remote.fingerprint == local.fingerprint and remote.describe() == local.describe()
    seqs, pos = [[5, 9, 11, 3, 7], [4, 8]], [[1, 3, 4], [0, 1]]
    a = local(seqs, positions=pos, keep_logits=[True, False])
    b = remote(seqs, positions=pos, keep_logits=[True, False])
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert torch.equal(ra[k], rb[k]), k
    for k, v in local.head_and_embeddings().items():
        assert torch.equal(v, remote.head_and_embeddings()[k]), k
    local.close()


def test_distill_uses_a_served_live_teacher(llama_teacher, corpus, served, tmp_path) -> None:
    from dskd_batch import distill
    from dskd_batch.config import DistillConfig

    runs = {}
    for name, teacher in (("local", str(llama_teacher)), ("served", served)):
        cfg = DistillConfig(student=str(llama_teacher), teacher=teacher, data=str(corpus), out=str(tmp_path / name),
                            method="kd", max_steps=2, batch_size=2, max_len=96, max_prompt_len=64, seed=3)
        distill(cfg)
        runs[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                      if '"loss"' in x]
    assert runs["local"] and [r["loss"] for r in runs["local"]] == [r["loss"] for r in runs["served"]]


def test_an_unknown_teacher_kind_or_a_dead_server_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(DskdError, match=r"no teacher kind for grpc://"):
        open_teacher("grpc://localhost:1")
    with pytest.raises(DskdError, match=r"/describe failed"):
        open_teacher("http://127.0.0.1:9")

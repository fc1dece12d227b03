"""The accelerator-speed machinery, checked on the CPU: stage one storing records on a thread of
its own writes the same shard as storing them in turn, and stops cleanly on an error; the auto
loss chunk follows the device; activation checkpointing changes no loss or gradient."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import cache_config, read_cache_arrays
from dskd_batch.cache.format import MANIFEST, SHARDS, TMP_MARK
from dskd_batch.cache.writer import StoreThread
from dskd_batch.errors import DskdError
from dskd_batch.methods import LossSettings
from dskd_batch.methods import make_method
from dskd_batch.train.trainer import auto_chunk


def _cache(teacher: Path, corpus: Path, out: Path, **kw):
    return cache_config(teacher, corpus, out, **{**dict(hidden="fp16", batch_tokens=200, shard_size=6, max_len=64,
                                                        max_prompt_len=40), **kw})


@pytest.mark.parametrize("hidden", ["fp16", "compact"])
def test_store_thread_writes_the_same_cache(llama_teacher, corpus, tmp_path, monkeypatch, hidden) -> None:
    import dskd_batch.teacher.caching as ct

    real = ct.write_shard
    outs = {}
    for overlap in (False, True):
        monkeypatch.setattr(ct, "write_shard", lambda *a, overlap_=overlap, **k: real(*a, **k, overlap=overlap_))
        outs[overlap] = tmp_path / f"overlap-{overlap}"
        ct.run(_cache(llama_teacher, corpus, outs[overlap], hidden=hidden), progress=False)
    a, b = read_cache_arrays(outs[False]), read_cache_arrays(outs[True])
    assert a.keys() == b.keys()
    for k in a:
        for f, va in a[k].items():
            assert torch.equal(va, b[k][f]) if isinstance(va, torch.Tensor) else va == b[k][f], (k, f)
    for s in sorted((outs[False] / SHARDS).iterdir()):  # the same bytes on disk, array by array
        for f in sorted(p for p in s.rglob("*") if p.is_file() and p.name != "shard.json"):
            assert f.read_bytes() == (outs[True] / SHARDS / s.name / f.relative_to(s)).read_bytes(), f


def test_store_thread_error_stops_the_shard(llama_teacher, corpus, tmp_path, monkeypatch) -> None:
    """A NaN found on the storing thread ends the command with the usual error; nothing of the
    shard is left, in the temporary folder or the final one."""
    import dskd_batch.teacher.caching as ct
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(llama_teacher))
    tok = AutoTokenizer.from_pretrained(str(llama_teacher))
    with torch.no_grad():
        m.get_input_embeddings().weight[tok("Rome", add_special_tokens=False)["input_ids"][0]] = float("nan")
    bad = tmp_path / "nan-teacher"
    m.save_pretrained(str(bad))
    tok.save_pretrained(str(bad))
    real = ct.write_shard
    monkeypatch.setattr(ct, "write_shard", lambda *a, **k: real(*a, **k, overlap=True))
    out = tmp_path / "cache"
    with pytest.raises(DskdError, match=r"NaN or infinite.*\n.*example .*: the teacher's hidden is not finite"):
        ct.run(_cache(bad, corpus, out, hidden="fp32"), progress=False)
    assert not (out / MANIFEST).exists()
    left = list((out / SHARDS).iterdir()) if (out / SHARDS).exists() else []
    assert not [p for p in left if TMP_MARK in p.name]


def test_store_thread_runs_jobs_in_order_and_bounds_the_queue() -> None:
    done, waiting = [], []
    gate = threading.Event()

    def job(i):
        def run():
            gate.wait(5)
            done.append(i)
        return run

    with StoreThread(depth=2) as st:
        t0 = time.perf_counter()
        st.submit(job(0))  # running (blocked on the gate)
        st.submit(job(1))
        st.submit(job(2))  # queue full now
        blocked = threading.Thread(target=lambda: (st.submit(job(3)), waiting.append(time.perf_counter())))
        blocked.start()
        time.sleep(0.3)
        assert not waiting  # the fourth job waits for room: at most depth + 1 batches in memory
        gate.set()
        blocked.join(5)
    assert done == [0, 1, 2, 3] and waiting and waiting[0] - t0 >= 0.3

    def boom():
        raise ValueError("bad record")

    with pytest.raises(ValueError, match="bad record"):
        with StoreThread(depth=2) as st:
            st.submit(boom)
            for _ in range(50):
                st.submit(lambda: done.append("after"))
                time.sleep(0.01)
    assert "after" not in done  # nothing runs after the first error


def test_auto_chunk_follows_the_device() -> None:
    ls = LossSettings("fkl", 2.0, 0.5)
    kd, dskd, sft = (make_method(n, ls) for n in ("kd", "dskd", "sft"))
    V = 128_256
    # a CPU keeps its rule whatever the memory
    assert auto_chunk(V, kd, "cpu", free_bytes=1 << 40) == auto_chunk(V, kd) == 2**26 // (2 * V)
    # an H200 (about 139 GB free): 4% of it for the chunk's logit sets
    h200 = 139 * 10**9
    assert auto_chunk(V, kd, "cuda", free_bytes=h200) == 1024
    assert auto_chunk(V, dskd, "cuda", free_bytes=h200) == 512
    assert auto_chunk(V, sft, "cuda", free_bytes=h200) == 2048
    # a 24 GB card with little free: the 1 GiB floor; huge free memory: the 8 GiB ceiling
    assert auto_chunk(V, dskd, "cuda", free_bytes=2 * 10**9) == 128
    assert auto_chunk(V, kd, "cuda", free_bytes=10**13) == 2048
    assert auto_chunk(1000, sft, "cuda", free_bytes=10**13) == 4096  # never past the cap
    assert auto_chunk(10_000_000, dskd, "cuda", free_bytes=0) == 64  # never below 64
    for free in (0, 10**9, 10**10, 10**11, 10**12):  # powers of two that do not shrink with more memory
        sizes = [auto_chunk(V, m, "cuda", free_bytes=free) for m in (sft, kd, dskd)]
        assert all(s & (s - 1) == 0 for s in sizes) and sizes == sorted(sizes, reverse=True)
    assert [auto_chunk(V, dskd, "cuda", free_bytes=f) for f in (10**10, 10**11, 10**12)] == sorted(
        auto_chunk(V, dskd, "cuda", free_bytes=f) for f in (10**10, 10**11, 10**12))


def _loss_and_grads(cache_dir, student_dir, method: str, *, checkpointing: bool = False,
                    compile_loss: bool = False) -> tuple[float, dict]:
    """One step's objective and every gradient, DSKD or KD from the test cache, chunks of 7 positions."""
    from transformers import AutoModelForCausalLM

    from dskd_batch.train.batches import CacheExamples, collate
    from dskd_batch.cache.reader import open_cache
    from dskd_batch.methods import TeacherHead
    from dskd_batch.train.projectors import build_projectors
    from dskd_batch.train.trainer import DistillModule

    cache = open_cache(cache_dir)
    mb = collate(CacheExamples(cache).records([0, 1, 2, 3]), pad_id=1, with_teacher=True)
    head = TeacherHead(cache.lm_head, cache.lm_head_bias, cache.logits_source)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(str(student_dir)).float()
    if checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    proj = build_projectors(student.get_output_embeddings().weight.shape[1], cache.lm_head.shape[1],
                            t2s=method == "dskd", s2t=method == "dskd", init="random", seed=1)
    module = DistillModule(student, proj, make_method(method, LossSettings("fkl", 2.0, 0.5)),
                           int(cache.settings["tokenizer"]["size"]), loss_chunk=7, compile_loss=compile_loss)
    terms = module(mb, head)
    terms["objective"].backward()
    return float(terms["objective"].detach()), {n: p.grad.clone() for n, p in module.named_parameters()
                                                if p.grad is not None}


def test_activation_checkpointing_same_losses_and_gradients(fp32_cache, gpt2_student) -> None:
    l0, g0 = _loss_and_grads(fp32_cache, gpt2_student, "dskd")
    l1, g1 = _loss_and_grads(fp32_cache, gpt2_student, "dskd", checkpointing=True)
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 4
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-5), n


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "dskd"])
def test_compiled_loss_chunks_equal_eager(method, fp32_cache, gpt2_student) -> None:
    """--compile-loss: the same losses and gradients as the eager chunks (up to the compiler's rounding)."""
    l0, g0 = _loss_and_grads(fp32_cache, gpt2_student, method)
    l1, g1 = _loss_and_grads(fp32_cache, gpt2_student, method, compile_loss=True)
    assert l0 == pytest.approx(l1, rel=1e-5)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-5, rtol=1e-4), n

"""--loss-chunk: the loss computed a few positions at a time (each chunk recomputed in backward)
equals the one-piece loss, value and every gradient, for each same-vocabulary method and distance,
with chunk sizes that do not divide the number of positions; and it bounds the memory."""

from __future__ import annotations

import pytest
import torch

from dskd_batch.train.batches import CacheExamples, collate
from dskd_batch.cache.reader import open_cache
from dskd_batch.methods import LossSettings, TeacherHead
from dskd_batch.methods import make_method
from dskd_batch.train.projectors import build_projectors
from dskd_batch.train.trainer import DistillModule

CASES = [("sft", "fkl", False), ("seqkd", "fkl", False)] + [("kd", d, False) for d in
                                                              ("fkl", "rkl", "js", "skl", "srkl", "akl")] + \
        [("dskd", d, False) for d in ("fkl", "rkl", "js", "skl", "srkl", "akl")] + [("dskd", "fkl", True)] + \
        [(m, "fkl", "teacher-correct") for m in ("kd", "dskd")]  # mask: True (agreement) or a kd_positions value


def step(cache_dir, student_dir, method, distance, mask, chunk, evaluate=False, eager=True):
    from transformers import AutoModelForCausalLM

    cache = open_cache(cache_dir)
    mb = collate(CacheExamples(cache).records([0, 2, 4, 6, 8]), pad_id=1, with_teacher=True)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(str(student_dir)).float().train()
    d_s = student.get_output_embeddings().weight.shape[1]
    projectors = build_projectors(d_s, cache.lm_head.shape[1], t2s=method == "dskd", s2t=method == "dskd",
                                  init="random", seed=1)
    m = make_method(method, LossSettings(distance, 2.0, 0.5, agreement_mask=mask is True,
                                         kd_positions=mask if isinstance(mask, str) else "all"))
    module = DistillModule(student, projectors, m, int(cache.settings["tokenizer"]["size"]), loss_chunk=chunk)
    module.eager_chunks = eager
    head = TeacherHead(cache.lm_head, cache.lm_head_bias, cache.logits_source)
    if evaluate:
        with torch.no_grad():
            return {k: float(v) for k, v in module(mb, head, evaluate=True).items()}, mb
    terms = module(mb, head)
    terms["objective"].backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in terms.items() if not k.startswith("_")}, grads, mb


@pytest.mark.parametrize("method,distance,mask", CASES)
def test_chunked_equals_one_piece(method, distance, mask, fp32_cache, gpt2_student):
    ref, g_ref, mb = step(fp32_cache, gpt2_student, method, distance, mask, 0)
    n = mb.targets.numel()
    for chunk in (7, 16):
        assert n % chunk and chunk < n  # chunks that do not divide N, and more than one of them
        got, g, _ = step(fp32_cache, gpt2_student, method, distance, mask, chunk)
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), (chunk, k)
        assert g.keys() == g_ref.keys()
        for name in g_ref:  # relative to the gradient's size (elementwise, fp32 summation order shows)
            err = float((g[name] - g_ref[name]).norm() / g_ref[name].norm().clamp_min(1e-12))
            assert err <= 1e-5, (chunk, name, err)


def test_chunked_held_out_sums(fp32_cache, gpt2_student):
    ref, _ = step(fp32_cache, gpt2_student, "kd", "fkl", False, 0, evaluate=True)
    got, _ = step(fp32_cache, gpt2_student, "kd", "fkl", False, 5, evaluate=True)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-5), k


@pytest.mark.parametrize("eager", [True, False])
def test_chunks_never_hold_the_whole_batch_of_logits(eager, fp32_cache, gpt2_student, monkeypatch):
    """The head runs on at most C rows at a time: once per chunk when the gradients are taken in the
    forward pass (EagerChunks), twice under activation checkpointing (forward + recomputation)."""
    from dskd_batch.train import trainer

    rows = []
    orig = trainer.DistillModule._chunk_losses

    def spy(self, h, *a):
        rows.append(h.shape[0])
        return orig(self, h, *a)

    monkeypatch.setattr(trainer.DistillModule, "_chunk_losses", spy)
    _, _, mb = step(fp32_cache, gpt2_student, "dskd", "fkl", False, 7, eager=eager)
    n = mb.targets.numel()
    assert max(rows) <= 7 and sum(rows) == (n if eager else 2 * n)


@pytest.mark.parametrize("method", ["kd", "dskd"])
def test_checkpointed_chunks_equal_one_piece(method, fp32_cache, gpt2_student):
    """The activation-checkpointing path (used under FSDP and for on-policy KD terms) is exact too."""
    ref, g_ref, _ = step(fp32_cache, gpt2_student, method, "fkl", False, 0)
    got, g, _ = step(fp32_cache, gpt2_student, method, "fkl", False, 7, eager=False)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k
    for name in g_ref:
        assert float((g[name] - g_ref[name]).norm() / g_ref[name].norm().clamp_min(1e-12)) <= 1e-5, name


def test_auto_chunk_gives_every_method_the_same_working_set():
    """--loss-chunk -1 divides one budget by the logit sets a method builds: at the Qwen2 vocabulary
    441 positions for SFT, 220 for KD, 110 for DSKD and DSKD-ETA (never fewer than 64)."""
    from dskd_batch.train.trainer import auto_chunk

    ls = LossSettings("fkl", 2.0, 0.5)
    got = {name: auto_chunk(151_936, make_method(name, ls)) for name in ("sft", "seqkd", "kd", "dskd", "dskd-eta",
                                                                          "mined", "uld")}
    assert got == {"sft": 441, "seqkd": 441, "kd": 220, "dskd": 110, "dskd-eta": 110, "mined": 220, "uld": 220}
    assert auto_chunk(49_152, make_method("dskd", ls)) == 341
    assert auto_chunk(10_000_000, make_method("dskd", ls)) == 64
    assert auto_chunk(49_152, make_method("dskd", ls), "cpu", free_bytes=1 << 40) == 341  # the CPU rule ignores memory

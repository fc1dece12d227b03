"""Stage one writes exactly what the teacher computed: hidden @ W.T reproduces the real logits,
top-k / log-sum-exp / argmax match at the stored (target) positions, for an untied LLaMA-style and
a tied GPT-2-style teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dskd_batch import open_cache
from dskd_batch.teacher.caching import run
from dskd_batch.config import CacheConfig
from dskd_batch.models import load_causal_lm
from dskd_batch.cache.head import reconstruct_logits


def _real_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0].float()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("hidden", ["fp32", "fp16"])
def test_cache_reproduces_teacher(arch: str, hidden: str, request, corpus: Path, tmp_path: Path) -> None:
    teacher = request.getfixturevalue(f"{arch}_teacher")
    out = tmp_path / "cache"
    run(CacheConfig(teacher=str(teacher), data=str(corpus), out=str(out), hidden=hidden, top_k=8,
                    batch_tokens=600, shard_size=5, max_len=64, max_prompt_len=40), progress=False)
    cache = open_cache(out, verify="full")
    model = load_causal_lm(teacher)
    assert len(cache) == 13  # 12 rows, one with two instances
    assert cache.settings["teacher"]["tied_embeddings"] == (arch == "gpt2")
    if arch == "llama":
        assert not torch.equal(cache.input_embeddings, cache.lm_head)
        assert torch.equal(cache.input_embeddings, model.get_input_embeddings().weight.float())
    assert torch.equal(cache.lm_head, model.get_output_embeddings().weight.float())
    worst = 0.0
    for i in range(len(cache)):
        rec = cache[i]
        n = rec["input_ids"].shape[0]
        pos = rec["positions"]  # format 2: the teacher is stored at the target positions only
        assert pos.tolist() == list(range(rec["prompt_len"] - 1, n - 1))
        assert rec["hidden"].shape == (len(pos), model.config.hidden_size if arch == "llama" else model.config.n_embd)
        real = _real_logits(model, rec["input_ids"])[pos]
        rebuilt = reconstruct_logits(rec["hidden"], cache.lm_head, cache.lm_head_bias)
        worst = max(worst, float((rebuilt - real).abs().max()))
        tv, ti = torch.topk(real, 8, dim=-1)
        torch.testing.assert_close(rec["topk_values"], tv, atol=1e-5, rtol=1e-5)
        assert torch.equal(rec["topk_indices"], ti)
        torch.testing.assert_close(rec["logsumexp"], torch.logsumexp(real, -1), atol=1e-5, rtol=1e-5)
        assert torch.equal(rec["argmax"], real.argmax(-1))
        assert rec["input_ids"][-1].item() == 0  # EOS appended
        assert 0 < rec["prompt_len"] < n
    # fp32: equal to rounding. fp16: |dlogit| <= 2^-11 * sum|h||w| ~ 2e-3 for these sizes.
    assert worst < (1e-4 if hidden == "fp32" else 5e-3), worst
    fid = cache.manifest["fidelity"]
    assert cache.manifest["logits_reconstructable"] is True
    assert cache.logits_source == "hidden"
    assert fid["exact_t1"]["kl_mean"] < 1e-8 and fid["exact_t1"]["top1_agreement"] == 1.0  # fp32 rounding
    assert fid["stored_t1"]["kl_mean"] < (1e-8 if hidden == "fp32" else 1e-5)


def test_soft_capped_teacher_is_flagged(tiny_tokenizer_dir: Path, corpus: Path, tmp_path: Path) -> None:
    """Gemma-2 soft-caps its logits, so h @ W.T is not the teacher's distribution: the cache must say so
    and fall back to the stored top-k logits."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5,
                       eos_token_id=0, bos_token_id=0, pad_token_id=1)
    d = tmp_path / "gemma"
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # random logits are tiny; make them large enough for the cap to bite
        model.get_output_embeddings().weight.mul_(50.0)
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    run(CacheConfig(teacher=str(d), data=str(corpus), out=str(tmp_path / "c"), hidden="fp32", top_k=8,
                    max_len=64, max_prompt_len=40, limit=4), progress=False)
    cache = open_cache(tmp_path / "c")
    assert cache.manifest["logits_reconstructable"] is False
    assert cache.logits_source == "topk"
    assert cache.manifest["fidelity"]["exact_t1"]["kl_mean"] > 1e-3
    # the assembled distribution still has the exact top-k probabilities
    rec = cache[0]
    logits = cache.teacher_logits(rec)
    p = torch.softmax(logits, -1)
    exact_top = torch.exp(rec["topk_values"] - rec["logsumexp"][:, None])
    torch.testing.assert_close(p.gather(-1, rec["topk_indices"]), exact_top, atol=1e-5, rtol=1e-4)


def test_the_head_runs_on_the_requested_positions_only(llama_teacher: Path) -> None:
    """TeacherForward hands the model's head only the positions asked for: the head sees [1, M, d]
    and every output equals the full forward's at those positions."""
    from dskd_batch.teacher.forward import TeacherForward

    model = load_causal_lm(llama_teacher)
    seen: list[tuple[int, ...]] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    tf = TeacherForward(model, 5, pad_id=1)
    seqs = [[5, 9, 13, 17, 21, 25, 29], [7, 11, 15, 19]]
    pos = [[3, 4, 5], [0, 2]]
    recs = tf(seqs, positions=pos, keep_logits=True)
    hook.remove()
    assert seen == [(1, 5, model.config.hidden_size)]
    for s, p, r in zip(seqs, pos, recs):
        real = _real_logits(model, torch.tensor(s))[p]
        assert r["positions"].tolist() == p and r["hidden"].shape[0] == len(p)
        torch.testing.assert_close(r["logits"], real, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["logsumexp"], torch.logsumexp(real, -1), atol=1e-5, rtol=1e-5)
        assert torch.equal(r["argmax"], real.argmax(-1)) and torch.equal(r["topk_indices"], real.topk(5).indices)
    empty = tf([[5, 9]], positions=[[]])[0]  # no position asked: empty rows, no error
    assert empty["hidden"].shape == (0, model.config.hidden_size) and empty["argmax"].shape == (0,)


def test_bf16_ties_are_not_top1_disagreements() -> None:
    """A bf16 teacher's logits tie often; which tied token argmax picks says nothing about whether
    h @ W.T is the teacher's function. The cache's choice of the exact source must not hinge on it
    (in a real bf16 cache it flipped on one token in 211)."""
    from dskd_batch.teacher.caching import decide_logits_source
    from dskd_batch.cache.head import kl_stats

    torch.manual_seed(0)
    exact = torch.randn(64, 500) * 3 + 10
    exact[:, 7] = 40.06  # the exact winner, 0.02 above a token it ties with once rounded (bf16 steps 0.25 here)
    exact[:, 3] = 40.04
    real = exact.bfloat16().float()  # what the bf16 teacher printed: token 3 comes first among the tied
    assert torch.equal(real[:, 3], real[:, 7])
    s = kl_stats(real, exact, 1.0, resolution=torch.finfo(torch.bfloat16).eps)
    assert s["top1_agreement"] == 0.0 and s["top1_within_rounding"] == 1.0
    wrong = exact.clone()
    wrong[:, 100] = exact.max(-1).values + 5  # a genuinely different winner
    assert kl_stats(real, wrong, 1.0, resolution=torch.finfo(torch.bfloat16).eps)["top1_within_rounding"] == 0.0

    settings = {"teacher": {"dtype": "bf16"}, "storage": {"hidden": "fp16", "top_k": 64}}
    fid = {"exact_t1": {"kl_mean": 3e-4, "top1_agreement": 0.9858, "top1_within_rounding": 1.0}}
    assert decide_logits_source(settings, fid) == ("hidden", True)
    fid["exact_t1"]["top1_within_rounding"] = 0.95
    assert decide_logits_source(settings, fid) == ("topk", False)
    del fid["exact_t1"]["top1_within_rounding"]  # a cache written before: the plain agreement decides
    assert decide_logits_source(settings, fid) == ("topk", False)
    fid["exact_t1"]["top1_agreement"] = 0.995
    assert decide_logits_source(settings, fid) == ("hidden", True)

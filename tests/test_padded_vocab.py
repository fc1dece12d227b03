"""Padded vocabularies: models whose embedding matrix has more rows than their tokenizer has tokens
(Qwen2.5: 152,064 rows for 151,665 tokens), as teacher and as student, from the cache and live, same
and cross vocabulary. The padding rows are never a target and never carry teacher mass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED

from dskd_batch.config import CacheConfig, DistillConfig
from dskd_batch.train.distill import run as distill

T_PAD, S_PAD = 24, 8


def _save(model: torch.nn.Module, tok, out: Path) -> Path:
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def padded(tiny_tokenizer_dir: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from dskd_batch.teacher.caching import run

    root = tmp_path_factory.mktemp("padded")
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    V = len(tok)
    torch.manual_seed(3)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=V + T_PAD, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           tie_word_embeddings=False, eos_token_id=0, bos_token_id=0, pad_token_id=1))
    with torch.no_grad():  # padding rows that would take most of the mass if they were not cut off
        teacher.lm_head.weight[V:] = teacher.lm_head.weight[:T_PAD] * 50
    student = GPT2LMHeadModel(GPT2Config(vocab_size=V + S_PAD, n_embd=24, n_layer=2, n_head=2, n_positions=512,
                                         eos_token_id=0, bos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0))
    paths = {"teacher": _save(teacher, tok, root / "teacher"), "student": _save(student, tok, root / "student"),
             "corpus": corpus, "root": root}
    for hidden in ("fp32", "none"):
        paths[f"cache-{hidden}"] = root / f"cache-{hidden}"
        run(CacheConfig(teacher=str(paths["teacher"]), data=str(corpus), out=str(paths[f"cache-{hidden}"]),
                        hidden=hidden, top_k=8, shard_size=5, batch_tokens=512, max_len=96, max_prompt_len=64),
            progress=False)
    return paths


def _cfg(p: dict[str, Path], out: Path, **kw) -> DistillConfig:
    base = dict(student=str(p["student"]), out=str(out), batch_size=2, lr=1e-3, max_steps=3, device="cpu",
                lr_schedule="constant", shuffle="global", max_len=96, max_prompt_len=64)
    base.update(kw)
    return DistillConfig(**base)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss" in x]


def test_padded_teacher_cache_holds_only_real_tokens(padded):
    from transformers import AutoTokenizer

    from dskd_batch import open_cache

    V = len(AutoTokenizer.from_pretrained(str(padded["teacher"])))
    for hidden in ("fp32", "none"):
        c = open_cache(padded[f"cache-{hidden}"])
        for i in range(len(c)):
            rec = c[i]
            assert int(rec["topk_indices"].max()) < V and int(rec["argmax"].max()) < V
            if hidden == "fp32":  # the stored head and the rebuilt distribution stop at the tokenizer
                assert c.teacher_logits(rec).shape[-1] == V
                lse = torch.logsumexp(c.teacher_logits(rec).double(), -1)
                assert torch.allclose(lse, rec["logsumexp"].double(), atol=1e-4)


@pytest.mark.parametrize("method", ["kd", "dskd"])
def test_padded_teacher_and_student_cache_equals_live(padded, method, tmp_path):
    a = distill(_cfg(padded, tmp_path / "cache", cache=str(padded["cache-fp32"]), method=method))
    b = distill(_cfg(padded, tmp_path / "live", teacher=str(padded["teacher"]), data=str(padded["corpus"]),
                     method=method))
    ma, mb = _metrics(a), _metrics(b)
    assert len(ma) == len(mb) == 3
    for ra, rb in zip(ma, mb):
        assert all(torch.isfinite(torch.tensor(ra[k])) for k in ("loss", "ce", "kd"))
        for k in ("loss", "ce", "kd"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5), (k, ra, rb)


def test_padded_topk_only_cache_trains_kd(padded, tmp_path):
    out = distill(_cfg(padded, tmp_path / "run", cache=str(padded["cache-none"]), method="kd"))
    assert all(r["kd"] >= 0 and torch.isfinite(torch.tensor(r["loss"])) for r in _metrics(out))


def test_padded_student_generates_only_real_tokens(padded, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dskd_batch.config import EvalConfig
    from dskd_batch.eval.evaluate import run as evaluate
    from dskd_batch.generation import SamplingSettings, sample_responses

    out = distill(_cfg(padded, tmp_path / "run", cache=str(padded["cache-fp32"]), method="sft"))
    model = AutoModelForCausalLM.from_pretrained(str(out / "student"))
    tok = AutoTokenizer.from_pretrained(str(out / "student"))
    V = len(tok)
    with torch.no_grad():  # padding rows that win every argmax unless generation cuts them off
        model.get_output_embeddings().weight[V:] = model.get_output_embeddings().weight[:S_PAD] * 100
    model.save_pretrained(str(out / "student"))
    prompts = [tok("Name a primary colour.")["input_ids"]]
    greedy = SamplingSettings(max_new_tokens=6, temperature=0.0)
    unguarded = sample_responses(model, prompts, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, settings=greedy)
    assert max(unguarded[0]) >= V  # the setup is what it says
    guarded = sample_responses(model, prompts, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, settings=greedy,
                               vocab=V)
    assert all(i < V for i in guarded[0])
    rep = evaluate(EvalConfig(model=str(out), data=str(padded["corpus"]), seeds="1", temperature=0.0,
                              max_new_tokens=6, limit=3, device="cpu"))
    gens = next(iter(json.loads((rep / "report.json").read_text())["sets"].values()))["generations"]
    assert len(gens) == 3 and all(isinstance(o, str) for g in gens for o in g["outputs"].values())


@pytest.mark.skipif(not (SHARED / "tokenizers").is_dir(), reason="needs ../shared/tokenizers")
@pytest.mark.parametrize("method", ["dskd-eta", "mined", "uld", "gold", "alm"])
def test_padded_cross_vocabulary(method, tmp_path_factory):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from dskd_batch.teacher.caching import run

    root = tmp_path_factory.mktemp(f"xpad-{method}")
    tt = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "smollm2"))
    st = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "gpt2"))
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tt) + T_PAD, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           tie_word_embeddings=False, eos_token_id=tt.eos_token_id))
    student = GPT2LMHeadModel(GPT2Config(vocab_size=len(st) + S_PAD, n_embd=24, n_layer=2, n_head=2,
                                         eos_token_id=st.eos_token_id, bos_token_id=st.eos_token_id))
    _save(teacher, tt, root / "teacher")
    _save(student, st, root / "student")
    rows = [json.loads(x) for x in (SHARED / "data" / "t0_mix" / "train.jsonl").read_text().splitlines()[:6]]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run(CacheConfig(teacher=str(root / "teacher"), data=str(root / "train.jsonl"), out=str(root / "cache"),
                    hidden="fp32", top_k=8, shard_size=10, max_len=96, max_prompt_len=64,
                    student_tokenizer=(str(root / "student"),)), progress=False)
    out = distill(DistillConfig(student=str(root / "student"), cache=str(root / "cache"), out=str(root / "run"),
                                method=method, batch_size=2, max_steps=2, device="cpu", lr=1e-3,
                                lr_schedule="constant"))
    for r in _metrics(out):
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "ce", "kd"))

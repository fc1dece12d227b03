"""Held-out evaluation during training (--eval-data, --keep-best), the teacher-forced NLL of
`evaluate`, and the chat template end to end, on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import make_cache
import torch

from dskd_batch.config import CacheConfig, DistillConfig, EvalConfig
from dskd_batch.data import encode, load_examples, render_prompt
from dskd_batch.train.distill import run
from dskd_batch.errors import DskdError

DEV_ROWS = [
    {"prompt": "Name a warm colour.", "response": "Orange is a warm colour."},
    {"prompt": "What is one plus one?", "response": "One plus one is two."},
    {"instruction": "Translate to French.", "input": "Good night", "output": "Bonne nuit"},
    {"prompt": "Capital of France?", "response": "Paris."},
    {"instruction": "Sort the numbers.", "input": "7, 3, 4", "output": "3, 4, 7"},
]


def eval_lines(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval_ce" in r]


@pytest.fixture(scope="module")
def dev_corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("dev") / "dev.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in DEV_ROWS) + "\n")
    return p


@pytest.fixture(scope="module")
def dev_cache(llama_teacher, dev_corpus, tmp_path_factory) -> Path:
    """The held-out rows cached with the same teacher and settings as the fp32 training cache."""
    out = tmp_path_factory.mktemp("devcache") / "c"
    make_cache(llama_teacher, dev_corpus, out)
    return out


def cfg(student: Path, out: Path, **kw) -> DistillConfig:
    base = dict(student=str(student), out=str(out), batch_size=2, grad_accum=1, lr=1e-2, max_steps=3, verify="full",
                device="cpu", lr_schedule="constant", eval_steps=1)
    base.update(kw)
    return DistillConfig(**base)


def reference(student_dir: Path, teacher_dir: Path | None, tok_dir: Path, dev: Path) -> dict[str, float]:
    """eval_ce / eval_kl / eval_top1 computed independently: one example at a time, float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    s = AutoModelForCausalLM.from_pretrained(str(student_dir)).eval()
    t = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval() if teacher_dir else None
    ce = kl = top1 = 0.0
    n = 0
    for ex in load_examples(dev).examples:
        e = encode(tok, render_prompt(ex, "alpaca", tok), ex.response, max_prompt_len=64, max_len=96, template="alpaca")
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            ls = torch.log_softmax(s(ids).logits[0].double(), -1)
            lt = torch.log_softmax(t(ids).logits[0].double(), -1) if t is not None else None
        for i in range(e.prompt_len - 1, len(e.input_ids) - 1):
            ce -= float(ls[i, e.input_ids[i + 1]])
            if lt is not None:
                kl += float((lt[i].exp() * (lt[i] - ls[i, :lt.shape[1]])).sum())
                top1 += float(ls[i].argmax() == lt[i].argmax())
            n += 1
    return {"eval_ce": ce / n, "eval_kl": kl / n, "eval_top1": top1 / n, "tokens": n}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_eval_on_a_corpus_equals_an_independent_computation(fp32_cache, gpt2_student, dev_corpus, tiny_tokenizer_dir,
                                                              tmp_path, precision):
    out = run(cfg(gpt2_student, tmp_path / "r", cache=str(fp32_cache), method="kd", eval_data=str(dev_corpus),
                  precision=precision))
    ev = eval_lines(out)
    assert [r["step"] for r in ev] == [1, 2, 3]
    assert "eval_kl" not in ev[-1]  # a corpus has no teacher record
    ref = reference(out / "student", None, tiny_tokenizer_dir, dev_corpus)
    assert ev[-1]["eval_tokens"] == ref["tokens"]
    # bf16: the body runs under autocast as in training, the head and the sums in fp32
    assert ev[-1]["eval_ce"] == pytest.approx(ref["eval_ce"], rel=1e-5 if precision == "fp32" else 1e-2)
    assert ev[0]["eval_ce"] != pytest.approx(ev[-1]["eval_ce"], rel=1e-3)  # it follows the training


def test_heads_run_in_fp32_under_autocast_and_for_bf16_weights():
    from dskd_batch.models import fp32_logits

    torch.manual_seed(0)
    lin, h = torch.nn.Linear(16, 50), torch.randn(7, 16) * 4
    want = h @ lin.weight.T + lin.bias
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, rounded = fp32_logits(lin, h), lin(h)
    assert rounded.dtype == torch.bfloat16 and not torch.allclose(rounded.float(), want, atol=1e-3)  # autocast alone
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)
    half = torch.nn.Linear(16, 50).to(torch.bfloat16)
    got = fp32_logits(half, h.bfloat16())
    want = h.bfloat16().float() @ half.weight.float().T + half.bias.float()
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)


def test_eval_on_a_cache_gives_kl_and_top1(fp32_cache, dev_cache, gpt2_student, llama_teacher, tiny_tokenizer_dir,
                                           dev_corpus, tmp_path):
    out = run(cfg(gpt2_student, tmp_path / "r", cache=str(fp32_cache), method="sft", eval_data=str(dev_cache),
                  batch_size=3, eval_steps=0, max_steps=None, epochs=2))
    ev = eval_lines(out)
    info = json.loads((out / "run.json").read_text())
    assert [r["step"] for r in ev] == [info["steps_per_epoch"], 2 * info["steps_per_epoch"]]  # each epoch's end
    ref = reference(out / "student", llama_teacher, tiny_tokenizer_dir, dev_corpus)
    for k in ("eval_ce", "eval_kl", "eval_top1"):
        assert ev[-1][k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k
    assert 0 < ev[-1]["eval_kl"] and 0 <= ev[-1]["eval_top1"] <= 1


def test_keep_best_exports_the_best_checkpoint(fp32_cache, dev_corpus, gpt2_student, tmp_path):
    from safetensors.torch import load_file

    # a learning rate far too high makes the held-out CE go up and down: the best is not the last
    out = run(cfg(gpt2_student, tmp_path / "r", cache=str(fp32_cache), method="kd", eval_data=str(dev_corpus),
                  keep_best="eval_ce", lr=0.3, max_steps=3))
    ev = eval_lines(out)
    best = min(ev, key=lambda r: r["eval_ce"])
    info = json.loads((out / "run.json").read_text())
    assert info["exported"]["which"] == "best" and info["exported"]["step"] == best["step"]
    assert info["exported"]["value"] == pytest.approx(best["eval_ce"])
    exported = load_file(str(out / "student" / "model.safetensors"))
    kept = load_file(str(out / "best" / "student" / "model.safetensors"))
    last = load_file(str(out / "student-last" / "model.safetensors"))
    assert all(torch.equal(exported[k], kept[k]) for k in kept)
    assert best["step"] != ev[-1]["step"], "the test needs a run whose last step is not its best"
    assert any(not torch.equal(exported[k], last[k]) for k in kept)
    # the exported student really has the best held-out CE
    ref = reference(out / "student", None, Path(str(out / "student")), dev_corpus)
    assert ref["eval_ce"] == pytest.approx(best["eval_ce"], rel=1e-5)


def test_keep_best_survives_a_resume(fp32_cache, dev_corpus, gpt2_student, tmp_path):
    from safetensors.torch import load_file

    base = cfg(gpt2_student, tmp_path / "a", cache=str(fp32_cache), method="kd", eval_data=str(dev_corpus),
               keep_best="eval_ce", lr=0.3, max_steps=6, save_steps=2)
    whole = run(base)

    class Stop(Exception):
        pass

    def stop_at(step):
        if step == 4:
            raise Stop

    import dataclasses

    part = dataclasses.replace(base, out=str(tmp_path / "b"))
    with pytest.raises(Stop):
        run(part, on_step=stop_at)
    resumed = run(dataclasses.replace(part, resume=True))
    assert [r["step"] for r in eval_lines(resumed)] == [1, 2, 3, 4, 5, 6]  # each step once after the resume
    a, b = (json.loads((d / "run.json").read_text())["exported"] for d in (whole, resumed))
    assert a["step"] == b["step"]
    wa, wb = (load_file(str(d / "student" / "model.safetensors")) for d in (whole, resumed))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_prune_when_done_keeps_the_exported_student_and_a_resume_does_nothing(fp32_cache, dev_corpus, gpt2_student,
                                                                             tmp_path):
    import dataclasses

    from safetensors.torch import load_file

    base = cfg(gpt2_student, tmp_path / "r", cache=str(fp32_cache), method="kd", eval_data=str(dev_corpus),
               keep_best="eval_ce", lr=0.3, max_steps=3, save_steps=1, keep_checkpoints=5)
    kept = run(dataclasses.replace(base, out=str(tmp_path / "kept")))
    pruned = run(dataclasses.replace(base, prune_when_done=True))
    assert len(list((kept / "checkpoints").iterdir())) == 3 and (kept / "best" / "student").is_dir()
    assert sorted(p.name for p in pruned.iterdir() if not p.name.startswith(".lock")) == [
        "metrics.jsonl", "run.json", "student", "student-last"]
    info = json.loads((pruned / "run.json").read_text())
    assert info["status"] == "done" and info["pruned"] is True
    assert info["exported"]["step"] == json.loads((kept / "run.json").read_text())["exported"]["step"]
    wa, wb = (load_file(str(d / "student" / "model.safetensors")) for d in (kept, pruned))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # pruning changed nothing that was exported

    # --resume on the finished, pruned run does nothing (it would otherwise train again from scratch) ...
    before = {p: p.stat().st_mtime_ns for p in pruned.rglob("*") if p.is_file() and ".lock" not in p.name}
    run(dataclasses.replace(base, prune_when_done=True, resume=True))
    assert {p: p.stat().st_mtime_ns for p in pruned.rglob("*") if p.is_file() and ".lock" not in p.name} == before
    # ... and is refused, before anything is written, under other settings
    with pytest.raises(DskdError, match="finished run of other settings and no checkpoint"):
        run(dataclasses.replace(base, prune_when_done=True, resume=True, max_steps=4))
    assert {p: p.stat().st_mtime_ns for p in pruned.rglob("*") if p.is_file() and ".lock" not in p.name} == before


@pytest.mark.parametrize("problem,kw,match", [
    ("no dev", dict(keep_best="eval_ce"), "give --eval-data"),
    ("bad metric", dict(keep_best="rouge", eval_data="x"), "keep_best must be one of"),
])
def test_config_refusals(gpt2_student, tmp_path, problem, kw, match):
    with pytest.raises(DskdError, match=match):
        cfg(gpt2_student, tmp_path / "r", cache="c", **kw)


def test_refusals_before_training(fp32_cache, dev_corpus, gpt2_student, gpt2_teacher, tmp_path):
    with pytest.raises(DskdError, match="needs the teacher's record"):
        run(cfg(gpt2_student, tmp_path / "a", cache=str(fp32_cache), eval_data=str(dev_corpus), keep_best="eval_kl"))
    with pytest.raises(DskdError, match="not found"):
        run(cfg(gpt2_student, tmp_path / "b", cache=str(fp32_cache), eval_data=str(tmp_path / "nope.jsonl")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_evaluate_reports_teacher_forced_nll(gpt2_student, dev_corpus, tiny_tokenizer_dir, tmp_path):
    from dskd_batch.eval.evaluate import run as eval_run

    out = eval_run(EvalConfig(model=str(gpt2_student), data=str(dev_corpus), seeds="1", max_new_tokens=3,
                              max_prompt_len=64, out=str(tmp_path / "e"), device="cpu"), progress=False)
    rep = json.loads((out / "report.json").read_text())
    nll = rep["sets"]["dev"]["nll"]
    # the same encoding with max_len 512 (a plain model's default)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gpt2_student))
    m = AutoModelForCausalLM.from_pretrained(str(gpt2_student)).eval()
    total, n = 0.0, 0
    for ex, g in zip(load_examples(dev_corpus).examples, rep["sets"]["dev"]["generations"], strict=True):
        e = encode(tok, render_prompt(ex, "alpaca", tok), ex.response, max_prompt_len=64, max_len=512, template="alpaca")
        with torch.no_grad():
            lp = torch.log_softmax(m(torch.tensor([e.input_ids])).logits[0].double(), -1)
        own = -sum(float(lp[i, e.input_ids[i + 1]]) for i in range(e.prompt_len - 1, len(e.input_ids) - 1))
        # each example's own nats and tokens sit beside its generations (the paired comparison reads them)
        assert g["id"] == ex.id and g["nll"]["tokens"] == len(e.input_ids) - e.prompt_len
        assert g["nll"]["nats"] == pytest.approx(own, rel=1e-5)
        total += own
        n += len(e.input_ids) - e.prompt_len
    assert nll["tokens"] == n and nll["nats_per_token"] == pytest.approx(total / n, rel=1e-5)
    assert "per_example" not in nll
    n_bytes = sum(len(ex.response.encode()) for ex in load_examples(dev_corpus).examples)
    assert nll["bits_per_byte"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-5)
    assert "dev NLL" in (out / "report.md").read_text()


CHAT = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant: {% endif %}")


def with_chat_template(model_dir: Path, out: Path) -> Path:
    import shutil

    shutil.copytree(model_dir, out)
    cfg_path = out / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    tc["chat_template"] = CHAT
    cfg_path.write_text(json.dumps(tc))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


def test_chat_template_end_to_end(llama_teacher, gpt2_student, corpus, dev_corpus, tmp_path):
    """template = chat: the cache, distill (with held-out eval) and evaluate all read the prompt
    the tokenizer's chat template renders, and the response ends with the tokenizer's EOS."""
    from transformers import AutoTokenizer

    from dskd_batch import open_cache
    from dskd_batch.teacher.caching import run as cache_run
    from dskd_batch.eval.evaluate import run as eval_run

    teacher = with_chat_template(llama_teacher, tmp_path / "teacher")
    student = with_chat_template(gpt2_student, tmp_path / "student")
    tok = AutoTokenizer.from_pretrained(str(teacher))
    assert tok.chat_template == CHAT
    cache_dir = tmp_path / "cache"
    cache_run(CacheConfig(teacher=str(teacher), data=str(corpus), out=str(cache_dir), hidden="fp32", top_k=8,
                          template="chat", max_len=96, max_prompt_len=64, batch_tokens=512), progress=False)
    cache = open_cache(cache_dir)
    assert cache.settings["template"]["name"] == "chat"
    ex = load_examples(corpus).examples[0]
    rec = cache[[cache[i]["id"] for i in range(len(cache))].index(ex.id)]
    prompt = tok.apply_chat_template([{"role": "user", "content": ex.instruction}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.startswith("### user: ") and prompt.endswith("### assistant: ")
    ids = rec["input_ids"].tolist()
    assert ids[:rec["prompt_len"]] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[rec["prompt_len"]:-1]) == ex.response and ids[-1] == tok.eos_token_id

    out = run(cfg(student, tmp_path / "run", cache=str(cache_dir), method="kd", eval_data=str(dev_corpus),
                  lr=1e-3, max_steps=2))
    assert json.loads((out / "run.json").read_text())["prompt"]["template"] == "chat"
    assert eval_lines(out)[-1]["eval_tokens"] > 0
    rep_dir = eval_run(EvalConfig(model=str(out), data=str(dev_corpus), seeds="1", max_new_tokens=3, device="cpu"),
                       progress=False)
    rep = json.loads((rep_dir / "report.json").read_text())
    gens = rep["sets"]["dev"]["generations"]
    assert all(g["prompt"].startswith("### user: ") and g["prompt"].endswith("### assistant: ") for g in gens)
    assert rep["sets"]["dev"]["nll"]["tokens"] == eval_lines(out)[-1]["eval_tokens"]


def cache_section(teacher: Path, corpus: Path) -> str:
    """The [cache] of the tiny pipeline files below (the settings of the fp32 test cache)."""
    return f"""[cache]
teacher = "{teacher}"
data = "{corpus}"
hidden = "fp32"
top_k = 8
max_len = 96
max_prompt_len = 64
batch_tokens = 512
"""


def kd_and_evaluate(dev: Path) -> str:
    """The end of the tiny pipeline files below: a kd run, a quick evaluation and the report."""
    return f"""[[runs]]
name = "kd"
method = "kd"
[evaluate]
data = "{dev}"
seeds = "1"
max_new_tokens = 2
limit = 2
[report]
"""


def test_pipeline_teacher_stage_is_reused_and_invalidates_the_cache(llama_teacher, corpus, dev_corpus, gpt2_student,
                                                                    tmp_path, monkeypatch):
    import dskd_batch.train.distill
    from dskd_batch.pipeline import run_pipeline

    def write(lr: str) -> Path:
        p = tmp_path / "p.toml"
        p.write_text(f"""
name = "t"
out = "{tmp_path / 'out'}"
[teacher]
max_steps = 2
batch_size = 4
lr = {lr}
eval_data = "{dev_corpus}"
""" + cache_section(llama_teacher, corpus) + f"""[student]
path = "{gpt2_student}"
[distill]
batch_size = 4
max_steps = 1
""" + kd_and_evaluate(dev_corpus))
        return p

    lines = run_pipeline(write("1e-3"))
    assert [x.split(":")[0] for x in lines[:-1]] == ["teacher", "cache", "evaluate teacher", "distill kd",
                                                     "evaluate kd"]
    out = tmp_path / "out"
    tuned = out / "teacher" / "student"
    from dskd_batch import open_cache
    from dskd_batch.models import load_causal_lm, model_fingerprint

    cache = open_cache(out / "cache")
    assert cache.settings["teacher"]["fingerprint"] == model_fingerprint(load_causal_lm(str(tuned)))
    assert cache.settings["teacher"]["fingerprint"] != model_fingerprint(load_causal_lm(str(llama_teacher)))
    table = (out / "report.md").read_text()
    assert "| teacher |" in table and "| kd |" in table

    def boom(*a, **k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(dskd_batch.train.distill, "run", boom)
    again = run_pipeline(write("1e-3"))
    assert again[0].startswith("teacher: reused")
    monkeypatch.undo()
    # other teacher settings: a new tuned teacher is needed, so the cache made from the old one is refused
    with pytest.raises(DskdError, match="teacher: .*teacher was made with other settings"):
        run_pipeline(write("2e-3"))
    import shutil

    shutil.rmtree(out / "teacher")
    with pytest.raises(DskdError, match="cache: .*cache was made with other settings"):
        run_pipeline(write("2e-3"))


def test_pipeline_dev_and_seqkd_caches_and_pruned_teacher(llama_teacher, corpus, dev_corpus, tmp_path):
    """[dev_cache] gives every run eval_kl; [seqkd_cache] feeds method seqkd; `from = "teacher"`
    prunes the tuned teacher; the report shows each run's held-out CE and KL."""
    from dskd_batch import open_cache
    from dskd_batch.pipeline import run_pipeline

    p = tmp_path / "p.toml"
    p.write_text(f"""
name = "t"
out = "{tmp_path / 'out'}"
[teacher]
max_steps = 1
batch_size = 4
lr = 1e-3
""" + cache_section(llama_teacher, corpus) + f"""[dev_cache]
data = "{dev_corpus}"
[seqkd_cache]
gen_max_new_tokens = 4
[student]
from = "teacher"
layers = 1
[distill]
batch_size = 4
max_steps = 2
keep_best = "eval_kl"
[[runs]]
name = "seqkd"
method = "seqkd"
""" + kd_and_evaluate(dev_corpus))
    lines = run_pipeline(p)
    assert [x.split(":")[0] for x in lines[:-1]] == ["teacher", "cache", "dev cache", "seqkd cache", "student",
                                                     "evaluate teacher", "distill seqkd", "evaluate seqkd",
                                                     "distill kd", "evaluate kd"]
    out = tmp_path / "out"
    assert open_cache(out / "seqkd-cache").settings.get("generation")
    assert json.loads((out / "seqkd" / "run.json").read_text())["config"]["cache"] == str(out / "seqkd-cache")
    kd = eval_lines(out / "kd")
    assert kd and all("eval_kl" in r for r in kd)
    assert json.loads((out / "kd" / "run.json").read_text())["exported"]["metric"] == "eval_kl"
    assert json.loads((out / "student" / "config.json").read_text())["num_hidden_layers"] == 1
    table = (out / "report.md").read_text()
    assert "held-out KL to teacher (run)" in table and "| kd |" in table

"""Conversation rows ({"messages": [...]}): the targets are exactly the assistant turns (end-of-turn
marker included), the cache stores the teacher there, KD from the cache equals KD with the live
teacher, evaluation answers the last turn, and each bad row is one clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SHARED, make_cache

from dskd_batch.config import DistillConfig
from dskd_batch.data import encode_conversation, load_examples, render_prompt
from dskd_batch.errors import DskdError

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TWO_TURNS = [{"role": "system", "content": "You are brief."},
             {"role": "user", "content": "What is the capital of Italy?"},
             {"role": "assistant", "content": "Rome."},
             {"role": "user", "content": "And of France?"},
             {"role": "assistant", "content": "Paris is the capital of France."}]
ROWS = [{"messages": TWO_TURNS},
        {"messages": [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Red."}]},
        {"prompt": "Two plus three?", "response": "Five."},
        {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"},
                      {"role": "user", "content": "Thanks."}]}]  # a trailing user turn: dropped


def _write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _example(messages: list) -> object:
    return load_examples_from([{"messages": messages}])[0]


def load_examples_from(rows: list, tmp: Path | None = None) -> list:
    import tempfile

    d = Path(tempfile.mkdtemp()) if tmp is None else tmp
    return load_examples(_write(d / "rows.jsonl", rows)).examples


def _chat_tokenizers() -> list:
    from transformers import AutoTokenizer

    names = [n for n in ("smollm2", "qwen2", "llama3") if (SHARED / "tokenizers" / n).is_dir()]
    toks = [AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / n)) for n in names]
    return [t for t in toks if t.chat_template]


@pytest.mark.skipif(not (SHARED / "tokenizers").is_dir(), reason="needs ../shared/tokenizers")
def test_targets_are_exactly_the_assistant_turns_with_real_chat_templates() -> None:
    toks = _chat_tokenizers()
    assert toks, "no tokenizer with a chat template in ../shared/tokenizers"
    ex = _example(TWO_TURNS)
    for tok in toks:
        enc = encode_conversation(tok, ex, max_len=512)
        ids, targets = enc.input_ids, enc.targets()
        assert targets == sorted(set(targets)) and all(0 <= p < len(ids) - 1 for p in targets)
        # the targets fall into contiguous runs, one per assistant turn
        runs, start = [], targets[0]
        for a, b in zip(targets, targets[1:] + [None]):
            if b != a + 1:
                runs.append([ids[p + 1] for p in range(start, a + 1)])
                start = b
        assert len(runs) == 2
        probe = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "XYZ"}],
                                        tokenize=False)
        marker = probe[probe.rindex("XYZ") + 3:].rstrip()  # the template's end-of-turn text, e.g. <|im_end|>
        assert marker
        for run, content in zip(runs, ("Rome.", "Paris is the capital of France.")):
            assert tok.decode(run).strip() == content + marker  # the content and its end-of-turn marker, nothing else
        # system and user turns (and the template's headers) are never targets
        others = [ids[p + 1] for p in range(len(ids) - 1) if p not in set(targets)]
        rest = tok.decode(others)
        assert "You are brief." in rest and "What is the capital of Italy?" in rest and "And of France?" in rest
        # the prompt of the last turn is what evaluation and on-policy sampling generate from
        prompt = render_prompt(ex, "chat", tok)
        assert prompt == tok.apply_chat_template(TWO_TURNS[:-1], tokenize=False, add_generation_prompt=True)
        assert tok.decode(ids[:enc.prompt_len]) == tok.decode(tok(prompt, add_special_tokens=False)["input_ids"])


def test_bad_conversations_are_one_clear_error(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    bad = {
        "no assistant turn": [{"role": "user", "content": "Hi"}],
        "unknown role 'robot'": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
        "'content' must be a string": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Yo"}],
        "must be a non-empty list": [],
    }
    for k, (msg, messages) in enumerate(bad.items()):
        p = _write(tmp_path / f"bad{k}.jsonl", [{"messages": [{"role": "user", "content": "ok"},
                                                              {"role": "assistant", "content": "fine"}]},
                                                {"messages": messages}])
        with pytest.raises(DskdError, match=f"bad{k}.jsonl:2: .*{msg}"):
            load_examples(p)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))  # no chat template
    ex = load_examples(_write(tmp_path / "ok.jsonl", ROWS[:1])).examples[0]
    with pytest.raises(DskdError, match="ok.jsonl:1: a conversation needs a tokenizer with a chat template"):
        render_prompt(ex, "chat", tok)
    with pytest.raises(DskdError, match="rendered with the tokenizer's chat template"):
        render_prompt(ex, "alpaca", tok)


@pytest.fixture(scope="module")
def chat_teacher(llama_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("chat-teacher")
    for f in llama_teacher.iterdir():
        shutil.copy(f, d / f.name)
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def chat_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("chat") / "train.jsonl", ROWS)


def _cache(teacher: Path, data: Path, out: Path, **kw) -> Path:
    return make_cache(teacher, data, out, **{**dict(shard_size=256, batch_tokens=4096, max_prompt_len=48,
                                                     template="chat"), **kw})


def test_cache_stores_the_teacher_at_the_assistant_turns(chat_teacher, chat_corpus, tmp_path):
    from transformers import AutoTokenizer

    from dskd_batch import open_cache
    from dskd_batch.models import load_causal_lm

    cache = open_cache(_cache(chat_teacher, chat_corpus, tmp_path / "c"))
    tok = AutoTokenizer.from_pretrained(str(chat_teacher))
    model = load_causal_lm(str(chat_teacher))
    examples = load_examples(chat_corpus).examples
    assert len(cache) == 4 and [cache[i]["id"] for i in range(4)] == [ex.id for ex in examples]
    for i, ex in enumerate(examples):
        rec = cache[i]
        if not ex.is_chat:
            continue
        enc = encode_conversation(tok, ex, max_len=96)
        assert rec["positions"].tolist() == enc.targets() and rec["input_ids"].tolist() == enc.input_ids
        assert json.loads(rec["messages"]) == [list(m) for m in ex.messages]
        with torch.no_grad():
            real = model(input_ids=rec["input_ids"][None]).logits[0][rec["positions"]]
        torch.testing.assert_close(rec["logsumexp"], torch.logsumexp(real, -1), atol=1e-5, rtol=1e-5)
        assert torch.equal(rec["argmax"], real.argmax(-1))
        turns = tok.decode(rec["input_ids"][rec["positions"] + 1])
        assert "Thanks." not in turns and tok.eos_token in turns


@pytest.mark.skipif(not (SHARED / "tokenizers").is_dir(), reason="needs ../shared/tokenizers")
def test_conversations_align_turn_by_turn_across_tokenizers(tmp_path):
    """A SmolLM2-vocabulary teacher and a Qwen2-vocabulary student: ETA pairs tokens only inside
    the same assistant turn, each pair's targets are the same text, and dskd-eta trains on it; a
    student tokenizer without a chat template is refused by name."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dskd_batch.cache.align import ALIGN_DIR, ALIGN_FILE, Alignment, token_table
    from dskd_batch import open_cache
    from dskd_batch.train.distill import run

    tt = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "smollm2"))
    st = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "qwen2"))
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tt), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, eos_token_id=tt.eos_token_id))
    teacher.save_pretrained(tmp_path / "teacher")
    tt.save_pretrained(tmp_path / "teacher")
    st.save_pretrained(tmp_path / "student-tok")
    data = _write(tmp_path / "chat.jsonl", ROWS)
    cache_dir = _cache(tmp_path / "teacher", data, tmp_path / "c", max_len=160,
                       student_tokenizer=(str(tmp_path / "student-tok"),))
    (d,) = [p for p in (cache_dir / ALIGN_DIR).iterdir() if (p / ALIGN_FILE).exists()]
    stats = json.loads((d / ALIGN_FILE).read_text())["stats"]
    assert stats["examples"] == 4 and stats["eta_coverage"] > 0.6
    al, cache = Alignment(d), open_cache(cache_dir)
    ttab, stab = token_table(tt), token_table(st)

    def turn_of(pos: list[int], j: int) -> int:  # which run of consecutive targets (assistant turn) row j is in
        return sum(1 for a, b in zip(pos[:j], pos[1:j + 1]) if b != a + 1)

    def last_of_turn(pos: list[int], j: int) -> bool:
        return j == len(pos) - 1 or pos[j + 1] != pos[j] + 1

    pairs = 0
    for i in range(4):
        rec, row = cache[i], al.row(i)
        t_pos, t_ids = rec["positions"].tolist(), rec["input_ids"].tolist()
        s_ids, s_pos = row["student_ids"].tolist(), row["student_targets"].tolist()
        if not rec["messages"]:
            assert s_pos == []  # prompt/response rows keep the rule
            continue
        assert s_pos and len(row["mined_t"]) == len(s_pos)
        n_turns = sum(1 for role, _ in json.loads(rec["messages"]) if role == "assistant")
        assert turn_of(s_pos, len(s_pos) - 1) == turn_of(t_pos, len(t_pos) - 1) == n_turns - 1  # one run per turn
        for js, jt in zip(row["eta_s"].tolist(), row["eta_t"].tolist()):
            assert turn_of(s_pos, js) == turn_of(t_pos, jt)  # never across turns
            s_text, t_text = stab.texts[s_ids[s_pos[js] + 1]], ttab.texts[t_ids[t_pos[jt] + 1]]
            assert s_text == t_text or (last_of_turn(s_pos, js) and last_of_turn(t_pos, jt))  # same bytes, or the markers
            pairs += 1
    assert pairs > 10
    torch.manual_seed(1)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=len(st), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, eos_token_id=st.eos_token_id))
    student.save_pretrained(tmp_path / "student")
    st.save_pretrained(tmp_path / "student")
    out = run(DistillConfig(student=str(tmp_path / "student"), out=str(tmp_path / "run"), cache=str(cache_dir),
                            method="dskd-eta", batch_size=2, max_steps=2, device="cpu", projector_init="random"))
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 2 and all(r["aligned"] > 0 and r["loss"] == r["loss"] for r in m)
    gpt2 = SHARED / "tokenizers" / "gpt2"
    if gpt2.is_dir():
        from dskd_batch.cache.align import build_alignment

        with pytest.raises(DskdError, match="a conversation needs a tokenizer with a chat template"):
            build_alignment(cache, AutoTokenizer.from_pretrained(str(gpt2)), "gpt2")


@pytest.mark.parametrize("method", ["kd", "dskd"])
def test_chat_rows_kd_from_cache_equals_live(method, chat_teacher, chat_corpus, tmp_path):
    from dskd_batch.train.distill import run

    cache = _cache(chat_teacher, chat_corpus, tmp_path / "c")
    common = dict(student=str(chat_teacher), method=method, batch_size=2, lr=1e-3, max_steps=2, device="cpu",
                  lr_schedule="constant", shuffle="global", max_len=96, max_prompt_len=48, template="chat")
    a = run(DistillConfig(out=str(tmp_path / "a"), cache=str(cache), **common))
    b = run(DistillConfig(out=str(tmp_path / "b"), teacher=str(chat_teacher), data=str(chat_corpus), **common))
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert len(ma) == len(mb) == 2
    for ra, rb in zip(ma, mb):
        for k in ("loss", "ce", "kd", "response_tokens"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (k, ra, rb)


def test_chat_rows_refused_where_they_do_not_fit(chat_teacher, chat_corpus, tmp_path):
    with pytest.raises(DskdError, match="a conversation has several assistant turns"):
        _cache(chat_teacher, chat_corpus, tmp_path / "g", generate=True)
    with pytest.raises(DskdError, match="--positions all is for prompt/response and text rows"):
        _cache(chat_teacher, chat_corpus, tmp_path / "a", positions="all")
    with pytest.raises(DskdError, match="rendered with the tokenizer's chat template"):
        _cache(chat_teacher, chat_corpus, tmp_path / "t", template="alpaca")
    assert not any((tmp_path / n).exists() for n in ("g", "a", "t"))
    long = _write(tmp_path / "long.jsonl", [{"messages": [{"role": "user", "content": "word " * 200},
                                                          {"role": "assistant", "content": "ok"}]}])
    with pytest.raises(DskdError, match="long.jsonl:1: no assistant token is left within max_len = 96"):
        _cache(chat_teacher, long, tmp_path / "l")


def test_evaluate_answers_the_last_turn(chat_teacher, chat_corpus, tmp_path):
    from dskd_batch.config import EvalConfig
    from dskd_batch.eval.evaluate import run as evaluate

    out = evaluate(EvalConfig(model=str(chat_teacher), data=str(chat_corpus), seeds="1", device="cpu",
                              template="chat", max_new_tokens=4, out=str(tmp_path / "e")))
    rep = json.loads((out / "report.json").read_text())
    (s,) = rep["sets"].values()
    assert s["examples"] == 4 and s["nll"]["tokens"] > 0
    gens = {g["references"][0]: g for g in s["generations"]}
    last = gens["Paris is the capital of France."]  # the reference is the last assistant turn ...
    assert last["prompt"].endswith("And of France?<|endoftext|>\n<|assistant|>")  # ... answered after the turns before it
    assert "Rome." in last["prompt"]


DEFAULT_SYSTEM = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|system|>You are a helpful"
                  " assistant named Tiny.{{ eos_token }}\n{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                  "\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_system_template_replaces_the_default_system_prompt(tiny_tokenizer_dir, tmp_path) -> None:
    """`chat:SYSTEM` puts SYSTEM where the template would add its default system prompt (`chat:` an empty
    turn: shorter rows), keeps a conversation's own system turn, and fingerprints differently."""
    from transformers import AutoTokenizer

    from dskd_batch.config import DistillConfig
    from dskd_batch.data import encode_example, encode_prompt, template_fingerprint

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    tok.chat_template = DEFAULT_SYSTEM
    rows = load_examples_from([{"prompt": "Two plus three?", "response": "Five."}, {"messages": TWO_TURNS},
                               {"messages": ROWS[1]["messages"]}], tmp_path)
    plain, conv_sys, conv = rows
    eos = tok.eos_token
    assert render_prompt(plain, "chat", tok) == (f"<|system|>You are a helpful assistant named Tiny.{eos}\n"
                                                 f"<|user|>Two plus three?{eos}\n<|assistant|>")
    assert render_prompt(plain, "chat:", tok) == f"<|system|>{eos}\n<|user|>Two plus three?{eos}\n<|assistant|>"
    assert render_prompt(plain, "chat:Be terse.", tok).startswith(f"<|system|>Be terse.{eos}\n<|user|>")
    n = {t: len(encode_prompt(tok, render_prompt(plain, t, tok), max_prompt_len=999, template=t))
         for t in ("chat", "chat:")}
    assert n["chat:"] < n["chat"]
    # a conversation's own system turn is kept; one without gets SYSTEM, and its targets stay the assistant turns
    assert "You are brief." in render_prompt(conv_sys, "chat:Be terse.", tok)
    enc = encode_example(tok, conv, render_prompt(conv, "chat:Be terse.", tok), max_prompt_len=96, max_len=96,
                         template="chat:Be terse.")
    text = tok.decode(enc.input_ids)
    assert text.startswith(f"<|system|>Be terse.{eos}") and "named Tiny" not in text
    assert tok.decode([enc.input_ids[p + 1] for p in enc.targets()]).strip() == f"Red.{eos}"
    fps = {template_fingerprint(t, tok) for t in ("chat", "chat:", "chat:Be terse.")}
    assert len(fps) == 3  # a cache made with one is refused for another
    with pytest.raises(DskdError, match="template must be"):
        DistillConfig(student="s", out="o", data="d", method="sft", template="chatt")

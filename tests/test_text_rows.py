"""Plain-text rows ({"text": ...}): every token a target, long documents cut into windows that drop
nothing, KD from the cache equal to KD with the live teacher, and one clear error per bad row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED, make_cache


from dskd_batch.config import DistillConfig
from dskd_batch.data import encode, load_examples, render_prompt, split_long_texts
from dskd_batch.errors import DskdError

DOC = ("Red is a primary colour. Two plus three is five. The sea is vast, salty and restless; waves roll in "
       "from far away. Gravity is the pull that masses exert on each other. Soft rain on the roof whispers to "
       "the sleeping town, and the morning smells of earth. Apple, banana and cherry are sweet. ") * 3


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [{"text": DOC}, {"text": "Rome is the capital of Italy."}, {"prompt": "Capital of Italy?", "response": "Rome."},
            {"text": "Bonjour means good morning. " * 4}]
    return _write(tmp_path_factory.mktemp("text") / "train.jsonl", rows)


def _tokenizers() -> list:
    from transformers import AutoTokenizer

    names = [n for n in ("smollm2", "llama2", "gpt2") if (SHARED / "tokenizers" / n).is_dir()]
    return [AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / n)) for n in names]


def test_windows_cover_the_document_once_and_every_token_is_a_target(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizers = [AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)), *_tokenizers()]
    for tok in tokenizers:
        ex = load_examples_from([{"text": DOC}])[0]
        whole = tok(DOC, add_special_tokens=False)["input_ids"]
        for max_len in (16, 33, 64):
            wins = split_long_texts([ex], tok, max_len)
            assert len(wins) > 1 and "".join(w.response for w in wins) == DOC  # every character once, in order
            assert [w.id for w in wins] == [f"{ex.id}#{k}" for k in range(len(wins))]
            assert split_long_texts([ex], tok, max_len) == wins  # deterministic
            n_targets = 0
            for w in wins:
                enc = encode(tok, render_prompt(w, "chat", tok), w.response, max_prompt_len=8, max_len=max_len,
                             template="chat")
                body = tok(w.response, add_special_tokens=False)["input_ids"]
                assert len(enc.input_ids) <= max_len and enc.input_ids[enc.prompt_len:] == body  # nothing cut
                assert enc.input_ids[-1] != tok.eos_token_id or body[-1] == tok.eos_token_id  # no EOS appended
                n_targets += len(enc.targets())
                if enc.prompt_len:  # a BOS-adding tokenizer: every token of the window is predicted
                    assert len(enc.targets()) == len(body)
            # the windows re-tokenise to the document's tokens, give or take a merge at each cut
            assert abs(sum(len(tok(w.response, add_special_tokens=False)["input_ids"]) for w in wins) - len(whole)) \
                <= len(wins)
            assert n_targets >= len(whole) - 2 * len(wins)


def load_examples_from(rows: list[dict], tmp: Path | None = None):
    import tempfile

    d = Path(tempfile.mkdtemp()) if tmp is None else tmp
    return load_examples(_write(d / "c.jsonl", rows)).examples


def test_short_text_is_one_example_with_no_prompt():
    ex = load_examples_from([{"text": "A short document."}])[0]
    assert ex.is_text and ex.response == "A short document." and render_prompt(ex, "alpaca") == ""


@pytest.mark.parametrize("row,match", [
    ({"text": "   "}, "c.jsonl:1: empty text"),
    ({"text": 3}, "c.jsonl:1: field 'text' must be a string"),
    ({"body": "x"}, "c.jsonl:1: row has none of prompt/response, instruction/output or text"),
])
def test_bad_text_rows(row, match):
    with pytest.raises(DskdError, match=match):
        load_examples_from([row])


def _cache(teacher: Path, data: Path, out: Path, **kw) -> Path:
    return make_cache(teacher, data, out, **{**dict(shard_size=3, max_len=40, max_prompt_len=16), **kw})


def test_cache_of_text_rows_predicts_every_window_token(llama_teacher, text_corpus, tmp_path):
    from transformers import AutoTokenizer

    from dskd_batch import open_cache

    cache = open_cache(_cache(llama_teacher, text_corpus, tmp_path / "c"))
    tok = AutoTokenizer.from_pretrained(str(llama_teacher))
    ids = [cache[i]["id"] for i in range(len(cache))]
    assert len(ids) > 4 and sum("#" in i for i in ids) >= 2  # the long document became windows
    for i in range(len(cache)):
        rec = cache[i]
        if rec["instruction"]:
            continue
        body = tok(rec["response"], add_special_tokens=False)["input_ids"]
        assert rec["input_ids"].tolist()[rec["prompt_len"]:] == body and len(rec["input_ids"]) <= 40
        # the teacher is stored at every position that predicts a token of the window
        assert rec["positions"].tolist() == list(range(len(rec["input_ids"]) - 1))
        assert rec["argmax"].shape[0] == len(rec["input_ids"]) - 1


@pytest.mark.parametrize("method", ["kd", "dskd"])
def test_text_rows_kd_from_cache_equals_live(method, llama_teacher, text_corpus, gpt2_student, tmp_path):
    from dskd_batch.train.distill import run

    cache = _cache(llama_teacher, text_corpus, tmp_path / "c")
    common = dict(student=str(gpt2_student), method=method, batch_size=2, lr=1e-3, max_steps=3, device="cpu",
                  lr_schedule="constant", shuffle="global", max_len=40, max_prompt_len=16)
    a = run(DistillConfig(out=str(tmp_path / "a"), cache=str(cache), **common))
    b = run(DistillConfig(out=str(tmp_path / "b"), teacher=str(llama_teacher), data=str(text_corpus), **common))
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert len(ma) == len(mb) == 3
    for ra, rb in zip(ma, mb):
        for k in ("loss", "ce", "kd", "response_tokens"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (k, ra, rb)


def test_text_rows_refused_where_there_is_no_prompt(llama_teacher, text_corpus, tmp_path):
    from dskd_batch.config import EvalConfig
    from dskd_batch.eval.evaluate import run as evaluate

    with pytest.raises(DskdError, match="--generate samples a response for each prompt"):
        _cache(llama_teacher, text_corpus, tmp_path / "g", generate=True)
    assert not (tmp_path / "g").exists()
    with pytest.raises(DskdError, match="a plain-text row has no prompt to answer"):
        evaluate(EvalConfig(model=str(llama_teacher), data=str(text_corpus), seeds="1", device="cpu"))
    from dskd_batch.train.distill import run

    with pytest.raises(DskdError, match="holds plain-text rows"):
        run(DistillConfig(student=str(llama_teacher), out=str(tmp_path / "op"), cache=str(_cache(llama_teacher,
            text_corpus, tmp_path / "c")), teacher=str(llama_teacher), on_policy=True, method="kd", max_steps=1,
            device="cpu"))


@pytest.mark.skipif(not (SHARED / "tokenizers").is_dir(), reason="needs ../shared/tokenizers")
def test_text_rows_align_across_tokenizers(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dskd_batch.cache.align import ALIGN_DIR, ALIGN_FILE

    tt = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "smollm2"))
    st = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "gpt2"))
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tt), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           eos_token_id=tt.eos_token_id))
    teacher.save_pretrained(tmp_path / "teacher")
    tt.save_pretrained(tmp_path / "teacher")
    st.save_pretrained(tmp_path / "student-tok")
    data = _write(tmp_path / "t.jsonl", [{"text": DOC}, {"text": "Plain text, aligned token by token."}])
    _cache(tmp_path / "teacher", data, tmp_path / "c", max_len=48, student_tokenizer=(str(tmp_path / "student-tok"),))
    (d,) = [p for p in (tmp_path / "c" / ALIGN_DIR).iterdir() if (p / ALIGN_FILE).exists()]
    stats = json.loads((d / ALIGN_FILE).read_text())["stats"]
    assert stats["examples"] > 2 and stats["eta_coverage"] > 0.8

"""Corpus loading (both row shapes, three formats), the truncation rule, length batching and the
errors a user sees for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dskd_batch.data import encode, length_batches, load_examples, render_prompt
from dskd_batch.errors import DskdError


def _write(p: Path, lines: list[str]) -> Path:
    p.write_text("\n".join(lines) + "\n")
    return p


def test_both_shapes_and_instances(corpus: Path) -> None:
    exs = load_examples(corpus).examples
    assert len(exs) == 13
    fr = [e for e in exs if e.instruction == "Translate to French."][0]
    assert (fr.input, fr.response) == ("Good morning", "Bonjour")
    senti = [e for e in exs if e.instruction == "Classify the sentiment."]
    assert [e.response for e in senti] == ["positive", "negative"]
    assert senti[1].source.endswith(":6 instance 1")
    assert len({e.id for e in exs}) == len(exs)
    assert load_examples(corpus, limit=3).examples == exs[:3]


def test_parquet_and_datasets_folder(corpus: Path, tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    flat = [r for r in rows if "prompt" in r]
    pq.write_table(pa.Table.from_pylist(flat), tmp_path / "c.parquet")
    a = load_examples(tmp_path / "c.parquet").examples
    datasets.DatasetDict({"train": datasets.Dataset.from_list(flat)}).save_to_disk(str(tmp_path / "ds"))
    b = load_examples(tmp_path / "ds").examples
    c = load_examples(_write(tmp_path / "c.jsonl", [json.dumps(r) for r in flat])).examples
    assert [(e.id, e.response) for e in a] == [(e.id, e.response) for e in b] == [(e.id, e.response) for e in c]
    with pytest.raises(DskdError, match="split 'test' not found"):
        load_examples(tmp_path / "ds", split="test")


def test_real_data_shapes() -> None:
    from conftest import SHARED

    if not SHARED.exists():
        pytest.skip("../shared is absent")
    t0 = load_examples(SHARED / "data/t0_mix/dev.jsonl").examples
    assert len(t0) == 480
    seed = load_examples(SHARED / "data/self_instruct_seed/seed_tasks.jsonl").examples
    assert len(seed) >= 175 and all(e.response for e in seed)


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a", "response": "b"', "malformed JSON"),
    ('{"prompt": "a"}', "no 'response'"),
    ('{"question": "a", "answer": "b"}', "none of prompt/response, instruction/output or text"),
    ('{"prompt": "a", "response": "   "}', "empty response"),
    ('{"instruction": "a", "instances": []}', "non-empty list"),
    ('[1, 2]', "must be a JSON object"),
    ('{"prompt": 3, "response": "b"}', "must be a string"),
])
def test_bad_rows_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    p = _write(tmp_path / "bad.jsonl", ['{"prompt": "ok", "response": "fine"}', line])
    with pytest.raises(DskdError, match=message) as e:
        load_examples(p)
    assert f"{p}:2" in str(e.value)
    assert "--skip-bad-rows" in str(e.value)
    rep = load_examples(p, skip_bad_rows=True)
    assert len(rep.examples) == 1 and len(rep.skipped) == 1


def test_empty_and_missing_corpus(tmp_path: Path) -> None:
    with pytest.raises(DskdError, match="no usable example"):
        load_examples(_write(tmp_path / "e.jsonl", [""]))
    with pytest.raises(DskdError, match="no usable example.*1 rows skipped"):
        load_examples(_write(tmp_path / "b.jsonl", ["{"]), skip_bad_rows=True)
    with pytest.raises(DskdError, match="corpus not found"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DskdError, match="unknown corpus format"):
        load_examples(_write(tmp_path / "x.csv", ["a,b"]))


def test_truncation_rule(tiny_tokenizer_dir: Path, corpus: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    ex = load_examples(corpus).examples[6]
    prompt = render_prompt(ex, "alpaca")
    assert prompt.endswith("### Response:\n") and ex.instruction in prompt
    p_ids = tok(prompt)["input_ids"]
    r_ids = tok(ex.response, add_special_tokens=False)["input_ids"]
    full = encode(tok, prompt, ex.response, max_prompt_len=1000, max_len=1000, template="alpaca")
    assert full.input_ids == p_ids + r_ids + [tok.eos_token_id] and full.prompt_len == len(p_ids)
    cut = encode(tok, prompt, ex.response, max_prompt_len=10, max_len=14, template="alpaca")
    assert cut.input_ids == p_ids[:10] + r_ids[:3] + [tok.eos_token_id] and cut.prompt_len == 10


def test_length_batches_respect_budget() -> None:
    lengths = [5, 50, 7, 49, 3, 20, 20, 1]
    batches = length_batches(lengths, 60)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 60
    assert length_batches(lengths, 60) == batches  # deterministic

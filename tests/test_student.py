"""init-student: K evenly spaced layers (first and last kept) with their weights copied."""

from __future__ import annotations

import pytest
import torch

from dskd_batch.errors import DskdError
from dskd_batch.student import init_student, kept_layers


def test_kept_layers():
    assert kept_layers(30, 4) == [0, 10, 19, 29]
    assert kept_layers(5, 5) == [0, 1, 2, 3, 4]
    assert kept_layers(6, 2) == [0, 5]
    with pytest.raises(DskdError):
        kept_layers(4, 5)


@pytest.mark.parametrize("fixture", ["llama_teacher", "gpt2_teacher"])
def test_init_student_copies_layers(fixture, request, tmp_path):
    from transformers import AutoModelForCausalLM

    src = request.getfixturevalue(fixture)
    out = init_student(str(src), 1, tmp_path / "s")
    t = AutoModelForCausalLM.from_pretrained(str(src))
    s = AutoModelForCausalLM.from_pretrained(str(out))
    ts, ss = t.state_dict(), s.state_dict()
    assert len(ss) < len(ts)
    for k, v in ss.items():  # layer 0 of the student is the teacher's last layer (index 1); the rest is shared
        tk = k.replace("layers.0.", "layers.1.").replace("h.0.", "h.1.")
        assert torch.equal(v, ts[tk]), k
    x = torch.tensor([[3, 5, 8, 13]])
    assert s(x).logits.shape == t(x).logits.shape


@pytest.mark.skipif(not (__import__("conftest").SHARED / "tokenizers").is_dir(), reason="needs ../shared/tokenizers")
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("target", ["gpt2", "llama2"])
def test_init_student_with_another_tokenizer_transplants_rows(tied, target, tmp_path):
    import json

    from conftest import SHARED
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dskd_batch.cross.align import text_index, token_table
    from dskd_batch.student import spell

    tt = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "smollm2"))
    st = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / target))
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tt), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                           num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
                                           eos_token_id=tt.eos_token_id))
    teacher.save_pretrained(tmp_path / "teacher")
    tt.save_pretrained(tmp_path / "teacher")
    out = init_student(str(tmp_path / "teacher"), 2, tmp_path / "student", tokenizer=str(SHARED / "tokenizers" / target))
    info = json.loads((out / "transplant.json").read_text())
    assert info["copied"] + info["composed"] + info["random"] == len(st) == info["student_vocab"]
    assert info["copied"] > 0.3 * len(st) and info["composed"] > 0 and info["random"] < 0.01 * len(st)
    student = AutoModelForCausalLM.from_pretrained(str(out))
    assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == st.get_vocab()
    assert student.config.vocab_size == len(st) and student.config.eos_token_id == st.eos_token_id
    e_t, e_s = teacher.get_input_embeddings().weight, student.get_input_embeddings().weight
    h_t, h_s = teacher.get_output_embeddings().weight, student.get_output_embeddings().weight
    ti, si = token_table(tt), token_table(st)
    index = text_index(ti)
    same = [(j, index[b]) for j, b in enumerate(si.texts) if b and b in index][:50]
    for j, i in same:  # a token with the teacher's bytes gets the teacher's rows
        assert torch.equal(e_s[j], e_t[i]) and torch.equal(h_s[j], h_t[i])
    longest = max(len(b) for b in index)
    other = [j for j, b in enumerate(si.texts) if b and b not in index]
    spelled = [j for j in other if spell(si.texts[j], index, longest) is not None]
    assert len(other) - len(spelled) <= info["random"] <= 0.01 * len(st)  # bytes the teacher has no token for
    for j in spelled[:20]:  # any other gets the mean of the teacher tokens that spell it
        rows = spell(si.texts[j], index, longest)
        assert len(rows) > 1 and b"".join(ti.texts[r] for r in rows) == si.texts[j]
        assert torch.allclose(e_s[j], e_t[rows].mean(0), atol=1e-6)
        assert torch.allclose(h_s[j], h_t[rows].mean(0), atol=1e-6)
    assert torch.equal(e_s[st.eos_token_id], e_t[tt.eos_token_id])
    assert (h_s.data_ptr() == e_s.data_ptr()) == tied
    ids = torch.tensor([st("Hello world, this is a test.")["input_ids"]])
    assert student(ids).logits.shape == (1, ids.shape[1], len(st))

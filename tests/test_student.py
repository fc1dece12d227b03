"""init-student: K evenly spaced layers (first and last kept), or the K of highest Block Influence,
with their weights copied."""

from __future__ import annotations

import pytest
import torch

from dskd_batch.errors import DskdError
from dskd_batch.train.student import init_student, kept_layers

from conftest import smollm2_teacher


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dskd_batch.cache.align import text_index, token_table
    from dskd_batch.train.transplant import spell

    _, teacher, tt = smollm2_teacher(tmp_path, tied, layers=3)
    st = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / target))
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


def _four_layers_one_identity(kind: str, tok_dir, out):
    """A 4-layer random model whose layer 2 writes nothing to the residual stream (output = input)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from conftest import _save_model

    V = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    torch.manual_seed(3)
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                         eos_token_id=0, bos_token_id=0, pad_token_id=1))
        layer = m.model.layers[2]
        parts = [layer.self_attn.o_proj, layer.mlp.down_proj]
    else:
        m = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=4, n_head=4, n_positions=512,
                                       eos_token_id=0, bos_token_id=0))
        layer = m.transformer.h[2]
        parts = [layer.attn.c_proj, layer.mlp.c_proj]
    with torch.no_grad():
        for p in parts:
            p.weight.zero_()
            if getattr(p, "bias", None) is not None:
                p.bias.zero_()
    return _save_model(m, tok_dir, out)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_block_influence_equals_an_independent_computation_and_drops_a_pass_through_layer(
        kind, tiny_tokenizer_dir, corpus, tmp_path):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dskd_batch.data import encode_example, load_examples, render_prompt
    from dskd_batch.train.student import block_influence, influence_layers

    src = _four_layers_one_identity(kind, tiny_tokenizer_dir, tmp_path / "t")
    model = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    tok = AutoTokenizer.from_pretrained(str(src))
    scores = block_influence(model, tok, corpus, "alpaca")  # batches of 8, padded
    assert len(scores) == 4 and abs(scores[2]) < 1e-9 and min(scores[:2] + scores[3:]) > 1e-3

    # one row at a time, no padding, from the model's own hidden states (the last one is after the
    # final norm, so layers 0..2 are checked this way)
    sums, n = torch.zeros(4, dtype=torch.float64), 0
    for ex in load_examples(corpus).examples[:64]:
        ids = encode_example(tok, ex, render_prompt(ex, "alpaca", tok), max_prompt_len=256, max_len=512,
                             template="alpaca").input_ids
        with torch.no_grad():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for i in range(3):
            cos = torch.nn.functional.cosine_similarity(hs[i][0].double(), hs[i + 1][0].double(), dim=-1)
            sums[i] += (1 - cos).sum()
        n += len(ids)
    for i in range(3):
        assert scores[i] == pytest.approx(float(sums[i] / n), rel=1e-6, abs=1e-9)

    assert influence_layers([0.5, 0.1, 0.3, 0.3], 2) == [0, 2]  # highest first, ties to the earlier layer
    out = init_student(str(src), 3, tmp_path / "s", select="influence", calibration=str(corpus))
    info = json.loads((out / "student.json").read_text())
    assert info["layers"] == [0, 1, 3] and info["select"] == "influence"
    t, s = model.state_dict(), AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    for k, v in s.items():  # student layer 2 is the teacher's layer 3
        tk = k.replace("layers.2.", "layers.3.").replace("h.2.", "h.3.")
        assert torch.equal(v, t[tk]), k


def test_influence_selection_needs_calibration_rows(llama_teacher, tmp_path):
    with pytest.raises(DskdError, match="give --calibration"):
        init_student(str(llama_teacher), 1, tmp_path / "s", select="influence")
    with pytest.raises(DskdError, match="calibration data not found"):
        init_student(str(llama_teacher), 1, tmp_path / "s", select="influence", calibration=str(tmp_path / "none.jsonl"))
    with pytest.raises(DskdError, match="calibration data not found"):  # also when it calibrates a transplant
        init_student(str(llama_teacher), 1, tmp_path / "s", tokenizer=str(llama_teacher),
                     calibration=str(tmp_path / "none.jsonl"))
    assert not (tmp_path / "s").exists()  # refused before anything is written


@pytest.mark.parametrize("tied", [True, False])
def test_calibration_gives_composed_tokens_their_share_of_the_mass_and_moves_only_their_head_rows(
        tied, corpus, tmp_path):
    """With --calibration, the composed tokens' mean probability on the calibration rows (recomputed
    here from the saved student, one row at a time) equals their share of those rows' tokens; each
    composed head row moved from the mean of its pieces by beta * (pieces - 1) along one direction;
    copied rows, and the input rows of an untied model, are the transplant's."""
    import json

    from conftest import SHARED
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dskd_batch.cache.align import text_index, token_table
    from dskd_batch.data import encode_example, load_examples, render_prompt
    from dskd_batch.train.transplant import spell

    _, _, tt = smollm2_teacher(tmp_path, tied, shift=0.5)
    gpt2 = str(SHARED / "tokenizers" / "gpt2")
    plain = init_student(str(tmp_path / "teacher"), 2, tmp_path / "plain", tokenizer=gpt2)
    out = init_student(str(tmp_path / "teacher"), 2, tmp_path / "cal", tokenizer=gpt2, calibration=str(corpus),
                       template="alpaca")
    cal = json.loads((out / "transplant.json").read_text())["calibration"]
    assert cal["composed_mass_before"] > cal["composed_share"] + 0.05 and cal["beta"] > 0
    assert cal["composed_mass_after"] == pytest.approx(cal["composed_share"], abs=1e-4)

    st = AutoTokenizer.from_pretrained(out)
    ti, si = token_table(tt), token_table(st)
    index = text_index(ti)
    longest = max(len(b) for b in index)
    pieces = torch.tensor([len(spell(b, index, longest) or []) if b and b not in index else 0 for b in si.texts])
    composed = pieces > 1
    a, b = (AutoModelForCausalLM.from_pretrained(str(p)).eval() for p in (plain, out))
    moved = b.lm_head.weight.detach() - a.lm_head.weight.detach()
    assert torch.equal(moved[~composed[:len(moved)]], torch.zeros_like(moved[~composed[:len(moved)]]))
    assert tied or torch.equal(a.get_input_embeddings().weight, b.get_input_embeddings().weight)
    u = -moved[composed][0] / moved[composed][0].norm()  # one direction for every composed row
    expect = -cal["beta"] * (pieces[composed] - 1).float()[:, None] * u
    assert torch.allclose(moved[composed], expect, atol=1e-5)
    assert torch.allclose(moved[composed].norm(dim=-1), cal["beta"] * (pieces[composed] - 1).float(), rtol=1e-3)

    mass, n_comp, n_tok = 0.0, 0, 0
    for ex in load_examples(corpus, limit=64).examples:
        ids = encode_example(st, ex, render_prompt(ex, "alpaca", st), max_prompt_len=256, max_len=512,
                             template="alpaca").input_ids
        with torch.no_grad():
            p = b(torch.tensor([ids])).logits[0].float().softmax(-1)
        mass += float(p[:, composed].sum())
        n_comp += int(composed[ids].sum())
        n_tok += len(ids)
    assert n_tok == cal["tokens"] and n_comp / n_tok == pytest.approx(cal["composed_share"])
    if n_tok <= cal["positions"]:  # every position was used: the mass is the one solved for
        assert mass / n_tok == pytest.approx(cal["composed_share"], abs=2e-3)


def _alm_loss_by_offsets(teacher, tt, student, st, texts, tau):
    """The warm-up's loss computed apart from the toolkit's alignment code: each token's end offset
    from the fast tokenizers' offset mappings (ASCII texts), chunks cut at the ends both share, the
    chunks holding either side's first token dropped, the binarised KL's mean over chunks."""
    import math

    out = []
    for text in texts:
        ends, lps = [], []
        for model, tok in ((teacher, tt), (student, st)):
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = torch.tensor([enc["input_ids"]])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            ends.append([e for _, e in enc["offset_mapping"]])
            lps.append(lp)
        common = sorted(set(ends[0]) & set(ends[1]))
        first = max(ends[0][0], ends[1][0])
        for lo, hi in zip(common, common[1:]):
            if lo < first:
                continue
            p, q = (float(sum(lp[k - 1] for k, e in enumerate(en) if k > 0 and lo < e <= hi)) for en, lp in zip(ends, lps))
            lp_, lq_ = p / tau - 1e-6, q / tau - 1e-6
            out.append(math.exp(lp_) * (lp_ - lq_) + (1 - math.exp(lp_)) * (math.log(-math.expm1(lp_)) - math.log(-math.expm1(lq_))))
    return sum(out) / len(out), len(out)


@pytest.mark.skipif(not (__import__("conftest").SHARED / "tokenizers").is_dir(), reason="needs ../shared/tokenizers")
@pytest.mark.parametrize("tied", [True, False])
def test_warmup_trains_only_the_composed_rows_against_the_teacher(tied, corpus, tmp_path):
    """--warmup-steps: its starting loss equals ALM's chunk loss computed from the tokenizers' offsets;
    it lowers that loss; only composed rows move (head and input rows alike), every other weight is the
    calibrated transplant's."""
    import json

    from conftest import SHARED
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dskd_batch.train.transplant import warmup_texts

    src, teacher, tt = smollm2_teacher(tmp_path, tied)
    gpt2 = str(SHARED / "tokenizers" / "gpt2")
    cal = init_student(str(src), 2, tmp_path / "cal", tokenizer=gpt2, calibration=str(corpus), template="alpaca")
    warm = init_student(str(src), 2, tmp_path / "warm", tokenizer=gpt2, calibration=str(corpus), template="alpaca",
                        warmup_steps=6, warmup_lr=3e-2)
    info = json.loads((warm / "transplant.json").read_text())["warmup"]
    st = AutoTokenizer.from_pretrained(str(warm))
    a, b = (AutoModelForCausalLM.from_pretrained(str(p)).eval() for p in (cal, warm))
    texts = warmup_texts(corpus, st, "alpaca", limit=256)
    assert all(t.isascii() for t in texts)
    loss, chunks = _alm_loss_by_offsets(teacher.eval(), tt, a, st, texts, info["tau"])
    assert info["chunks"] == chunks and info["loss_before"] == pytest.approx(loss, rel=1e-4)
    assert info["loss_after"] < info["loss_before"]
    assert _alm_loss_by_offsets(teacher, tt, b, st, texts, info["tau"])[0] == pytest.approx(info["loss_after"], rel=1e-4)

    from dskd_batch.cache.align import text_index, token_table
    from dskd_batch.train.transplant import spell

    ti, si = token_table(tt), token_table(st)
    index = text_index(ti)
    longest = max(len(x) for x in index)
    composed = torch.tensor([bool(x) and x not in index and len(spell(x, index, longest) or []) > 1 for x in si.texts])
    sa, sb = a.state_dict(), b.state_dict()
    for name, w in sa.items():
        moved = (sb[name] != w).any(-1) if w.shape[0] == len(st) else (sb[name] != w).any()
        if w.shape[0] == len(st):  # an embedding or head matrix: composed rows only, and some of them
            assert not moved[~composed[:len(moved)]].any(), name
            assert moved.any(), name
        else:
            assert not moved, name


def test_warmup_needs_a_transplant_and_calibration_rows(llama_teacher, corpus, tmp_path):
    import json

    with pytest.raises(DskdError, match="--warmup-steps trains"):
        init_student(str(llama_teacher), 1, tmp_path / "s", warmup_steps=5, calibration=str(corpus))
    with pytest.raises(DskdError, match="--warmup-steps trains"):
        init_student(str(llama_teacher), 1, tmp_path / "s", tokenizer=str(llama_teacher), warmup_steps=5)
    with pytest.raises(DskdError, match="--warmup-steps must be"):
        init_student(str(llama_teacher), 1, tmp_path / "s", tokenizer=str(llama_teacher), calibration=str(corpus),
                     warmup_steps=-1)
    assert not (tmp_path / "s").exists()
    out = init_student(str(llama_teacher), 1, tmp_path / "same", tokenizer=str(llama_teacher), calibration=str(corpus),
                       warmup_steps=5)  # the teacher's own vocabulary: nothing composed, nothing to train
    assert json.loads((out / "transplant.json").read_text())["warmup"] == {"data": str(corpus), "steps": 0,
                                                                           "skipped": "no composed rows"}

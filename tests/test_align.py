"""Cross-tokenizer alignment on the real tokenizers in ../shared/tokenizers, over the real
instruction data in ../shared/data: token bytes, vocabulary maps, ETA pairs (checked with the
tokenizers' own decoders, not with our spans), coverage, and MinED's DTW against brute force."""

from __future__ import annotations

import itertools
import json
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dskd_batch.cache.align import (align_example, chunk_ids, content_spans, dtw_path, eta_pairs, levenshtein,
                                   mined_alignment, response_targets, space_swap, token_table, vocab_map)
from dskd_batch.data import encode, load_examples, render_prompt

from conftest import SHARED

pytestmark = pytest.mark.skipif(not (SHARED / "tokenizers").is_dir(), reason="needs ../shared/tokenizers")

# (teacher, student): the pairs the issue names, and the reverse of each
PAIRS = [("gpt2", "qwen2"), ("llama2", "gpt2"), ("llama2", "llama3"), ("smollm2", "gpt2"), ("phi3", "qwen2")]
ALL_PAIRS = PAIRS + [(s, t) for t, s in PAIRS]
TOKENIZERS = sorted({n for p in PAIRS for n in p} | {"starcoder", "falcon"})


@lru_cache(maxsize=None)
def tok(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / name))


@lru_cache(maxsize=None)
def table(name: str):
    return token_table(tok(name))


@lru_cache(maxsize=None)
def examples() -> tuple:
    seed = load_examples(SHARED / "data" / "self_instruct_seed" / "seed_tasks.jsonl").examples
    t0 = load_examples(SHARED / "data" / "t0_mix" / "train.jsonl", limit=400).examples
    return tuple(seed + t0)


def encoded(name: str, ex, max_len: int = 512):
    return encode(tok(name), render_prompt(ex, "alpaca"), ex.response, max_prompt_len=256, max_len=max_len,
                  template="alpaca")


@lru_cache(maxsize=None)
def vmap(t: str, s: str):
    return vocab_map(table(t), table(s))


@lru_cache(maxsize=None)
def swap(name: str):
    return space_swap(table(name))


def align_pair(t: str, s: str, ex, max_len: int = 512):
    te, se = encoded(t, ex, max_len), encoded(s, ex, max_len)
    oracle = np.array(te.input_ids[1:] + [tok(t).eos_token_id])[te.targets()]  # predicts each next token
    return te, se, align_example(ex.response, te.input_ids, te.prompt_len, oracle, se, table(t), table(s), vmap(t, s),
                                 swap(t))


@pytest.mark.parametrize("name", TOKENIZERS)
def test_token_bytes_rebuild_the_text(name: str) -> None:
    """Concatenating the bytes of a response's tokens gives the response (SentencePiece: after its
    dummy leading space), for every example: the byte table is right for every token used."""
    tb = table(name)
    for ex in examples()[:250]:
        ids = tok(name)(ex.response, add_special_tokens=False)["input_ids"]
        joined = b"".join(tb.texts[i] or b"" for i in ids)
        text = ex.response.encode()
        assert joined == text or (joined[:1] == b" " and joined[1:] == text), (name, ex.response[:60])


def test_sentencepiece_byte_fallback_and_newlines() -> None:
    tb = table("llama2")
    nl = tok("llama2").convert_tokens_to_ids("<0x0A>")
    assert tb.texts[nl] == b"\n" and tb.byte_fallback[nl]
    assert tb.texts[tok("llama2").convert_tokens_to_ids("▁Hello")] == b" Hello"
    assert table("gpt2").texts[tok("gpt2").convert_tokens_to_ids("Ċ")] == b"\n"
    assert table("gpt2").texts[tok("gpt2").convert_tokens_to_ids("ĠHello")] == b" Hello"
    assert table("gpt2").texts[tok("gpt2").eos_token_id] is None  # a special token stands for no text


@pytest.mark.parametrize("t,s", PAIRS)
def test_vocab_map_pairs_tokens_of_the_same_bytes(t: str, s: str) -> None:
    tt, ts = table(t), table(s)
    m = vocab_map(tt, ts)
    assert m[tt.eos] == ts.eos
    hit = np.nonzero(m >= 0)[0]
    assert len(hit) > 10_000
    for i in hit[:: max(1, len(hit) // 2000)]:
        if i != tt.eos:
            assert tt.texts[i] == ts.texts[m[i]]
    # a regular piece is preferred to a byte-fallback piece of the same byte
    if s == "llama2":
        assert not ts.byte_fallback[m[tok(t).convert_tokens_to_ids("a")]]


def decoded_pieces(name: str, ids: list[int]) -> list[tuple[str, str]]:
    """(text before token k, text through token k) as the tokenizer itself decodes them."""
    t = tok(name)
    return [(t.decode(ids[:k]), t.decode(ids[:k + 1])) for k in range(len(ids))]


def check_pairs_decode_alike(t: str, s: str, ex, max_len: int = 512) -> None:
    te, se, a = align_pair(t, s, ex, max_len)
    t_tg, s_tg = response_targets(te.input_ids, te.prompt_len), response_targets(se.input_ids, se.prompt_len)
    tt, ss = tok(t), tok(s)
    for j, i in zip(a.eta_s, a.eta_t):
        if t_tg[i] == tt.eos_token_id or s_tg[j] == ss.eos_token_id:
            assert t_tg[i] == tt.eos_token_id and s_tg[j] == ss.eos_token_id
            assert i == len(t_tg) - 1 and j == len(s_tg) - 1
            assert tt.decode(t_tg[:-1]) == ss.decode(s_tg[:-1])  # both end the same text
            continue
        texts = [tt.decode(t_tg[:i]), ss.decode(s_tg[:j]), tt.decode(t_tg[:i + 1]), ss.decode(s_tg[:j + 1])]
        if any("\ufffd" in x for x in texts) and "\ufffd" not in ex.response:
            # a boundary inside a multi-byte character: decoders disagree on how many U+FFFD to show,
            # so compare the bytes the two tokens stand for instead
            assert table(t).texts[t_tg[i]] == table(s).texts[s_tg[j]]
            continue
        # the same text before, and the same text through the token: same token text, same offset
        assert texts[0] == texts[1], (t, s, i, j)
        assert texts[2] == texts[3], (t, s, i, j)
    check_chunks_decode_alike(t_tg, s_tg, a.chunk_t, a.chunk_s, tt, ss, ex)


def check_chunks_decode_alike(t_tg, s_tg, chunk_t, chunk_s, tt, ss, ex) -> None:
    """ALM's chunks: each chunk's tokens are consecutive on both sides and decode, by each tokenizer's
    own decoder, to the same text through the chunk's end."""
    assert len(chunk_t) == len(t_tg) and len(chunk_s) == len(s_tg)
    ids = sorted({c for c in chunk_s if c >= 0})
    assert ids == sorted({c for c in chunk_t if c >= 0})  # a chunk has tokens on both sides
    for c in ids:
        ti = [k for k, x in enumerate(chunk_t) if x == c]
        si = [k for k, x in enumerate(chunk_s) if x == c]
        assert ti and si and ti == list(range(ti[0], ti[-1] + 1)) and si == list(range(si[0], si[-1] + 1))
        a, b = tt.decode(t_tg[:ti[-1] + 1]), ss.decode(s_tg[:si[-1] + 1])
        if t_tg[ti[-1]] == tt.eos_token_id or "\ufffd" in a + b and "\ufffd" not in ex.response:
            continue
        assert a == b, (c, a[-30:], b[-30:])


MARKS = ["\n", "\n\n", "  ", "\t", "é", "日本語", "😀", " <0x0A> ", "Ġ", "▁", "ß", "\u00a0", "'s", "12345"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=st.sampled_from(ALL_PAIRS), k=st.integers(0, 10_000), cut=st.floats(0, 1), mark=st.sampled_from(MARKS),
       at=st.floats(0, 1), max_len=st.sampled_from([512, 160]))
def test_eta_pairs_are_the_same_text_at_the_same_offset(pair, k, cut, mark, at, max_len) -> None:
    """Property: over the real data (cut, with awkward text inserted, sometimes truncated), every
    ETA pair decodes, by each tokenizer's own decoder, to the same text at the same offset."""
    from dskd_batch.data import Example

    ex = examples()[k % len(examples())]
    r = ex.response[: max(1, int(len(ex.response) * (0.3 + 0.7 * cut)))]
    pos = int(len(r) * at)
    r = (r[:pos] + mark + r[pos:]).strip() or "x"
    # the oracle is each tokenizer's decoder: only texts both represent exactly (SentencePiece reads a
    # literal "▁" as a space, for one)
    assume(all(tok(n).decode(tok(n)(r, add_special_tokens=False)["input_ids"]) == r for n in pair))
    check_pairs_decode_alike(*pair, Example(ex.id, ex.instruction, ex.input, r, ex.source), max_len)


def coverage(t: str, s: str) -> tuple[float, float]:
    pos = pairs = mined = 0
    for ex in examples():
        _, _, a = align_pair(t, s, ex)
        pos += len(a.mined_t)
        pairs += len(a.eta_s)
        mined += sum(1 for x in a.mined_t if x >= 0)
    return pairs / pos, mined / pos


@pytest.mark.parametrize("t,s", PAIRS)
def test_eta_coverage_reaches_070(t: str, s: str, record_property) -> None:
    """Offset-based ETA covers >= 70% of the student's response tokens on the named pairs (the
    reference's token-string walk: 0.28-0.34 on SentencePiece <-> byte-BPE pairs)."""
    eta, mined = coverage(t, s)
    record_property("coverage", {"eta": eta, "mined": mined})
    print(f"{t} -> {s}: ETA {eta:.3f}, MinED {mined:.3f}")
    assert eta >= 0.70, (t, s, eta)


def test_every_pair_aligns_the_real_data() -> None:
    """Both directions of each pair, on a sample: every pair decodes alike (no hypothesis)."""
    for (t, s), ex in itertools.product(ALL_PAIRS, examples()[::60]):
        check_pairs_decode_alike(t, s, ex)


def test_chunks_end_where_both_tokenizations_cut_the_same_bytes() -> None:
    """Chunks between the offsets where a token ends on both sides; a chunk not tiled on one side (a
    token outside the text) or the tail after the last common offset gets -1; the final EOS tokens
    are a chunk of their own when both responses end together."""
    t = [(0, 3), (3, 5), (5, 9), None]
    s = [(0, 2), (2, 5), (5, 7), (7, 9), None]
    assert chunk_ids(t, s, True, True) == ([0, 0, 1, 2], [0, 0, 1, 1, 2])
    assert chunk_ids(t, s[:-2] + [(7, 8), None], True, True) == ([0, 0, -1, -1], [0, 0, -1, -1, -1])
    assert chunk_ids([(0, 3), (3, 5)], [(0, 2), (2, 5)], False, False) == ([0, 0], [0, 0])
    assert chunk_ids([(1, 3)], [(0, 3)], False, False) == ([-1], [-1])  # different starts: nothing aligns


def test_eos_pairs_only_when_both_responses_end_together() -> None:
    ex = next(e for e in examples() if len(e.response) > 300)
    _, _, full = align_pair("gpt2", "llama2", ex, 512)
    te, se, cut = align_pair("gpt2", "llama2", ex, 300)  # truncated differently by the two tokenizers
    assert full.eta_s[-1] == len(full.mined_t) - 1  # the two EOS targets pair
    s_tg = response_targets(se.input_ids, se.prompt_len)
    t_tg = response_targets(te.input_ids, te.prompt_len)
    if tok("gpt2").decode(t_tg[:-1]) != tok("llama2").decode(s_tg[:-1]):
        assert len(s_tg) - 1 not in cut.eta_s


def test_a_dummy_prefix_token_pairs_through_the_space_swap() -> None:
    """A LLaMA-2 response encoded on its own starts with ``▁The`` (bytes " The"), which covers the text
    "The" as the byte-BPE teacher's ``The`` does: the same span, two tokens that differ by the dummy-prefix
    space. They pair with eta_shift 1, and the label is the teacher's top-1 read through the space swap
    (a teacher predicting ``The`` there labels the student's ``▁The``, its target); MinED does not match
    them; every other pair is of tokens with the same own bytes. The other way round the same, and two
    byte-level BPEs have no shifted pair."""
    from dskd_batch.data import Example

    ex = Example("x", "Name a colour.", "", "The sky is blue.", "t")
    te, se, a = align_pair("smollm2", "llama2", ex)  # the oracle teacher predicts each next token
    t_tg, s_tg = response_targets(te.input_ids, te.prompt_len), response_targets(se.input_ids, se.prompt_len)
    assert table("llama2").texts[s_tg[0]] == b" The" and table("smollm2").texts[t_tg[0]] == b"The"
    assert content_spans(s_tg, table("llama2"), b"The sky is blue.")[0] == (0, 3)  # the span is the teacher's
    assert a.eta_s[0] == 0 and a.eta_t[0] == 0 and a.eta_shift[0] == 1 and a.eta_label[0] == s_tg[0]
    assert a.mined_t[0] == -1 and a.chunk_s[0] >= 0 and a.chunk_s[0] == a.chunk_t[0]
    assert sum(a.eta_shift) == 1 and a.eta_s[1] == 1  # " sky", an ordinary pair
    for j, i, sh in zip(a.eta_s[:-1], a.eta_t[:-1], a.eta_shift):  # the last pair is the two EOS tokens
        assert sh or table("llama2").texts[s_tg[j]] == table("smollm2").texts[t_tg[i]]
    assert [int(x) for x in a.eta_label[1:-1]] == [s_tg[j] for j in a.eta_s[1:-1]]  # the oracle's labels
    te2, se2, back = align_pair("llama2", "smollm2", ex)  # the teacher's token has the space now
    s_tg2 = response_targets(se2.input_ids, se2.prompt_len)
    assert back.eta_shift[0] == 1 and back.eta_label[0] == s_tg2[0] and back.mined_t[0] == -1
    _, _, bpe = align_pair("smollm2", "gpt2", ex)  # two byte-level BPEs: no dummy prefix
    assert bpe.eta_s[0] == 0 and bpe.mined_t[0] == 0 and not any(bpe.eta_shift)


@pytest.mark.parametrize("name", ["llama2", "gpt2", "smollm2"])
def test_space_swap_exchanges_a_word_with_its_spaced_twin(name: str) -> None:
    """An involution (a permutation of the logits) that maps ``X`` to `` X`` and back where both exist."""
    sw, tb, t = swap(name), table(name), tok(name)
    assert np.array_equal(sw[sw], np.arange(len(tb))) and (sw != np.arange(len(tb))).sum() > 1000
    word = t.convert_tokens_to_ids("The")
    spaced = t.convert_tokens_to_ids("▁The" if name == "llama2" else "ĠThe")
    assert sw[word] == spaced and sw[spaced] == word and tb.texts[spaced] == b" " + tb.texts[word]
    assert sw[tb.eos] == tb.eos


def test_normaliser_changes_are_not_paired_wrongly() -> None:
    """Qwen2 normalises to NFC: a decomposed accent is rewritten, so the bytes no longer match the
    text there; tokens around it still pair correctly and none pairs across the change."""
    text = "Cafe\u0301 au lait, please.\nThank you."
    t_ids = tok("qwen2")(text, add_special_tokens=False)["input_ids"]
    s_ids = tok("gpt2")(text, add_special_tokens=False)["input_ids"]
    raw = text.encode()
    ts, ss = content_spans(t_ids, table("qwen2"), raw), content_spans(s_ids, table("gpt2"), raw)
    for sp, i in zip(ts, t_ids):
        if sp is not None:
            assert raw[sp[0]:sp[1]] == table("qwen2").texts[i]
    ps, pt, shift = eta_pairs(ts, ss, False, False, [table("qwen2").texts[i] for i in t_ids],
                              [table("gpt2").texts[i] for i in s_ids])
    assert not any(shift)
    assert len(ps) >= 5
    for j, i in zip(ps, pt):
        assert table("qwen2").texts[t_ids[i]] == table("gpt2").texts[s_ids[j]]


def naive_levenshtein(a: bytes, b: bytes) -> int:
    if not a or not b:
        return len(a) + len(b)
    return min(naive_levenshtein(a[1:], b) + 1, naive_levenshtein(a, b[1:]) + 1,
               naive_levenshtein(a[1:], b[1:]) + (a[0] != b[0]))


@given(st.binary(max_size=6), st.binary(max_size=6))
def test_levenshtein_matches_the_recursive_definition(a: bytes, b: bytes) -> None:
    assert levenshtein(a, b) == naive_levenshtein(a, b)


def all_paths(n: int, m: int):
    def rec(i, j):
        if (i, j) == (n - 1, m - 1):
            yield [(i, j)]
            return
        for di, dj in ((1, 1), (1, 0), (0, 1)):
            if i + di < n and j + dj < m:
                for rest in rec(i + di, j + dj):
                    yield [(i, j)] + rest
    yield from rec(0, 0)


@given(st.integers(1, 5), st.integers(1, 5), st.data())
def test_dtw_finds_the_cheapest_monotone_path(n: int, m: int, data) -> None:
    cost = np.array(data.draw(st.lists(st.lists(st.integers(0, 4), min_size=m, max_size=m), min_size=n, max_size=n)),
                    dtype=float)
    path = dtw_path(cost)
    assert path[0] == (0, 0) and path[-1] == (n - 1, m - 1)
    assert all(0 <= b[0] - a[0] <= 1 and 0 <= b[1] - a[1] <= 1 and a != b for a, b in zip(path, path[1:]))
    best = min(sum(cost[i, j] for i, j in p) for p in all_paths(n, m))
    assert sum(cost[i, j] for i, j in path) == best


def test_mined_pairs_identical_tokens_one_to_one() -> None:
    t = [b"The", b" cat", b" sat", b" on", b" the", b" mat", b"\x00eos"]
    s = [b"The", b" c", b"at", b" sat", b" on", b" the", b" ma", b"t", b"\x00eos"]
    m = mined_alignment(t, s)
    assert m == [0, -1, -1, 2, 3, 4, -1, -1, 6]


def test_align_cli_reports_and_refuses(tmp_path) -> None:
    """`dskd-batch align` on something that is not a cache fails with one clear line."""
    from click.testing import CliRunner

    from dskd_batch.cli import main

    r = CliRunner().invoke(main, ["align", str(tmp_path), "--student-tokenizer", str(SHARED / "tokenizers" / "gpt2")])
    assert r.exit_code == 2 and "not a dskd-batch cache" in r.output
    r = CliRunner().invoke(main, ["align", str(tmp_path)])
    assert r.exit_code == 2 and "--student-tokenizer" in r.output


def test_data_sample_is_real() -> None:
    rows = [json.loads(x) for x in (SHARED / "data" / "t0_mix" / "train.jsonl").read_text().splitlines()[:3]]
    assert all("response" in r for r in rows)

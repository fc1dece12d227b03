"""Sampling: the vectorised n-gram block bans exactly what transformers' processor bans, and
sampling through it draws the same tokens as ``generate``'s own processors with the same seed."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_no_repeat_ngram_bans_what_transformers_bans(n):
    from transformers import NoRepeatNGramLogitsProcessor

    from dskd_batch.generation import NoRepeatNGram

    g = torch.Generator().manual_seed(n)
    ours, theirs = NoRepeatNGram(n), NoRepeatNGramLogitsProcessor(n)
    banned_any = 0
    for length in range(1, 40):
        ids = torch.randint(0, 5, (4, length), generator=g)  # a small vocabulary, so n-grams repeat
        ids[0, :length // 2] = 1  # a left-padded row: its padding takes part, as in transformers
        ids[1] = torch.arange(length) % 3  # a periodic row repeats n-grams of every size
        scores = torch.randn(4, 7, generator=g)
        want = theirs(ids, scores.clone())
        got = ours(ids, scores)
        assert torch.equal(got, want), (n, length)
        banned_any += int(torch.isinf(got).sum())
    assert banned_any > 20  # the cases did ban tokens


def test_sampling_with_the_block_draws_what_generate_draws():
    from transformers import LlamaConfig, LlamaForCausalLM

    from dskd_batch.generation import SamplingSettings

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=12, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    ids = torch.randint(3, 12, (3, 5))
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)]:
        s = SamplingSettings(max_new_tokens=24, temperature=temperature, top_p=top_p, no_repeat_ngram_size=2)
        builtin = {"do_sample": temperature > 0, "no_repeat_ngram_size": 2}
        if temperature > 0:
            builtin.update(temperature=temperature, top_p=top_p, top_k=0)
        outs = []
        for kw in (s.generate_kwargs(), builtin):
            torch.manual_seed(5)
            outs.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                       min_new_tokens=24, pad_token_id=0, eos_token_id=2, **kw))
        assert torch.equal(outs[0], outs[1]), (temperature, top_p)
        new = outs[0][:, 5:].tolist()
        for row in new:  # and no bigram repeats within the generated tokens
            pairs = list(zip(row, row[1:]))
            assert len(pairs) == len(set(pairs))

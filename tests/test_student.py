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

"""One DSKD (and KD) step against the reference code's formulas on the same batch.

The reference (songmzhang/DSKD, `criterions/dual_space_kd.py` and `various_divergence.py`) works on
whole padded sequences: labels with -100 at prompt and padding positions, the student's and the
live teacher's full [B, L, V] logits and last hidden states, CE on raw logits, every KL at the KD
temperature, each term masked and summed, loss = (1 - r) CE + r (t2s CE + t2s KD + s2t KD). The
formulas are written out here again, in that shape, and compared with what our training loop
computes from the cache on the response positions only: the loss and every gradient must agree."""

from __future__ import annotations

import pytest
import torch

from dskd_batch.train.batches import CacheExamples, collate
from dskd_batch.cache.reader import open_cache
from dskd_batch.methods import LossSettings, TeacherHead
from dskd_batch.methods import make_method
from dskd_batch.train.projectors import build_projectors
from dskd_batch.train.trainer import DistillModule

IGNORE = -100


def ref_fkl(logits, teacher_logits, T):
    """The reference's forward KL at temperature T, per position (not reduced)."""
    lprobs = torch.log_softmax(logits / T, -1, dtype=torch.float32)
    tp = torch.softmax(teacher_logits / T, -1, dtype=torch.float32)
    tlp = torch.log_softmax(teacher_logits / T, -1, dtype=torch.float32)
    return (tp * (tlp - lprobs)).sum(-1)


def ref_ce(logits, label):
    mask = label.ne(IGNORE)
    target = torch.where(mask, label, torch.zeros_like(label)).unsqueeze(-1)
    nll = -torch.log_softmax(logits, -1, dtype=torch.float32).gather(-1, target).squeeze(-1)
    return (nll * mask).sum()


@pytest.mark.parametrize("method", ["kd", "dskd"])
def test_one_step_equals_the_reference_formulas(method, fp32_cache, llama_teacher, gpt2_student):
    from transformers import AutoModelForCausalLM

    T, r = 2.0, 0.5
    cache = open_cache(fp32_cache)
    recs = CacheExamples(cache).records([0, 3, 5, 7])
    mb = collate(recs, pad_id=1, with_teacher=True)
    vocab = int(cache.settings["tokenizer"]["size"])

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(str(gpt2_student)).float().train()
    teacher = AutoModelForCausalLM.from_pretrained(str(llama_teacher)).float().eval()
    w_s = student.get_output_embeddings().weight
    projectors = build_projectors(w_s.shape[1], cache.lm_head.shape[1], t2s=method == "dskd", s2t=method == "dskd",
                                  init="random", seed=3)
    m = make_method(method, LossSettings("fkl", T, r))
    module = DistillModule(student, projectors, m, vocab)
    head = TeacherHead(cache.lm_head, cache.lm_head_bias, cache.logits_source)
    ours = module(mb, head)["objective"]
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)

    # the reference's shape: labels over the whole padded batch
    label = torch.full_like(mb.input_ids, IGNORE)
    label[mb.select] = mb.targets  # position i is labelled with token i + 1 at the response positions
    assert torch.equal(label[:, :-1][mb.select[:, :-1]], mb.input_ids[:, 1:][mb.select[:, :-1]])
    out = student(mb.input_ids, attention_mask=mb.attention_mask, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(mb.input_ids, attention_mask=mb.attention_mask, output_hidden_states=True)
    pad = label.ne(IGNORE)
    ce = ref_ce(out.logits, label)
    if method == "kd":
        kd = (ref_fkl(out.logits, t_out.logits, T) * pad).sum()
    else:
        t2s_logits = projectors["t2s"](t_out.hidden_states[-1]).matmul(w_s.detach().transpose(-1, -2))
        t2s_ce = ref_ce(t2s_logits, label)
        t2s_kd = (ref_fkl(out.logits, t2s_logits.detach(), T) * pad).sum()
        s2t_logits = projectors["s2t"](out.hidden_states[-1]) @ teacher.get_output_embeddings().weight.detach().T
        s2t_kd = (ref_fkl(s2t_logits, t_out.logits, T) * pad).sum()
        kd = t2s_kd + t2s_ce + s2t_kd
    ref = (1 - r) * ce + r * kd
    ref.backward()
    g_ref = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert g_ours.keys() == g_ref.keys()
    assert any(n.startswith("projectors.") for n in g_ours) == (method == "dskd")
    for n in g_ref:
        assert torch.allclose(g_ours[n], g_ref[n], rtol=1e-4, atol=1e-6), n


def test_kd_from_the_cache_equals_trls_gkd_loss(fp32_cache, llama_teacher, gpt2_student):
    """The peer a user would pick instead, TRL's GKD trainer off-policy with beta 0, computes the
    same loss as our KD at kd_rate 1 and temperature 1 (its loss reads no temperature): its own
    function on the live teacher's logits over the padded batch against ours from the cache on
    the response positions, per response token. `benchmarks/bench_trl.py` checks this on the real
    teacher before it times either."""
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDTrainer

    cache = open_cache(fp32_cache)
    mb = collate(CacheExamples(cache).records([0, 2, 4, 6]), pad_id=1, with_teacher=True)
    student = AutoModelForCausalLM.from_pretrained(str(gpt2_student)).float().eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(llama_teacher)).float().eval()
    module = DistillModule(student, build_projectors(8, 8, t2s=False, s2t=False, init="random", seed=0),
                           make_method("kd", LossSettings("fkl", 1.0, 1.0)), int(cache.settings["tokenizer"]["size"]),
                           loss_chunk=0)
    head = TeacherHead(cache.lm_head, cache.lm_head_bias, cache.logits_source)
    with torch.no_grad():
        ours = float(module(mb, head)["objective"]) / int(mb.select.sum())
        labels = torch.full_like(mb.input_ids, IGNORE)  # TRL's labels: the token itself where it is a target
        labels[:, 1:][mb.select[:, :-1]] = mb.input_ids[:, 1:][mb.select[:, :-1]]
        s = student(mb.input_ids, attention_mask=mb.attention_mask).logits
        t = teacher(mb.input_ids, attention_mask=mb.attention_mask).logits
        theirs = float(GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels[:, 1:], beta=0.0))
    assert ours == pytest.approx(theirs, rel=1e-5)
    # and not by accident: the reverse KL (beta 1) is another number
    assert abs(float(GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels[:, 1:], beta=1.0)) - ours) > 1e-3 * ours

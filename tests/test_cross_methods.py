"""The cross-vocabulary losses against naive per-example, per-position float64 implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dskd_batch.train.aligned import cross_part as _cross_part
from dskd_batch.losses import fkl
from dskd_batch.methods import (ALM, DSKDCMA, DSKDETA, GOLD, ULD, CrossBatch, LossInputs, LossSettings, MinED, TeacherBatch,
                                TeacherHead, uld_distance)
from dskd_batch.train.projectors import build_projectors

torch.manual_seed(0)
V_S, V_T, D_S, D_T = 11, 13, 6, 8


def batch(lengths=((5, 4), (3, 6))):
    """Two examples: (student response positions, teacher response positions) each."""
    g = torch.Generator().manual_seed(1)
    recs = []
    for b, (n_s, n_t) in enumerate(lengths):
        s_ids = torch.randint(0, V_S, (2 + n_s,), generator=g)
        t_ids = torch.randint(0, V_T, (3 + n_t,), generator=g)
        k = min(n_s, n_t)
        eta_s = torch.arange(0, k, 2)
        eta_t = torch.arange(k - 1, -1, -2)[: len(eta_s)]
        label = torch.randint(-1, V_S, (len(eta_s),), generator=g)
        mined = torch.randint(-1, n_t, (n_s,), generator=g)
        recs.append({"input_ids": s_ids, "prompt_len": 2, "teacher_input_ids": t_ids, "teacher_prompt_len": 3,
                     "positions": torch.arange(2, 2 + n_t),  # the teacher's response positions
                     "hidden": torch.randn(n_t, D_T, generator=g), "argmax": torch.zeros(n_t, dtype=torch.long),
                     "topk_values": None, "topk_indices": None, "logsumexp": None, "logits": None,
                     "eta_s": eta_s, "eta_t": eta_t, "eta_label": label, "mined_t": mined})
    return recs


T_SWAP = torch.tensor([1, 0, 3, 2, 4, 6, 5, 7, 8, 9, 10, 11, 12])  # space swaps: involutions of each vocabulary
S_SWAP = torch.tensor([2, 1, 0, 3, 4, 6, 5, 7, 8, 9, 10])


def parts(shifted: bool = False):
    """The batch flattened; ``shifted``: the first pair of each example differs by a dummy-prefix space."""
    recs = batch()
    if shifted:
        for r in recs:
            r["eta_shift"] = (torch.arange(len(r["eta_s"])) == 0).long()
    tb, cross = _cross_part(recs)
    n = len(cross.seg_s)
    targets = torch.cat([r["input_ids"][2:] for r in recs])
    s = torch.randn(n, V_S, dtype=torch.float64, requires_grad=True)
    h_s = torch.randn(n, D_S, dtype=torch.float64)
    w_t = torch.randn(V_T, D_T)
    return recs, tb, cross, targets, s, h_s, TeacherHead(w_t, None, "hidden", embed=torch.randn(V_T, D_T))


def test_cross_part_flattens_indices_per_example() -> None:
    recs, tb, cross, *_ = parts()
    assert len(cross.seg_s) == 5 + 3 and len(cross.seg_t) == 4 + 6 and tb.hidden.shape == (10, D_T)
    # the teacher hidden row at flat position eta_t is the record's row eta_t (its response positions)
    off_s = off_t = 0
    for b, r in enumerate(recs):
        sel = cross.seg_s[cross.eta_s] == b
        assert torch.equal(cross.eta_t[sel] - off_t, r["eta_t"])
        assert torch.equal(tb.hidden[cross.eta_t[sel]], r["hidden"][r["eta_t"]])
        assert torch.equal(cross.s_inputs[cross.seg_s == b], r["input_ids"][1:-1])
        assert torch.equal(cross.t_targets[cross.seg_t == b], r["teacher_input_ids"][3:])
        n_s, n_t = len(r["input_ids"]) - 2, len(r["teacher_input_ids"]) - 3
        k = min(n_s, n_t)
        assert torch.equal(cross.uld_s[(cross.uld_s >= off_s) & (cross.uld_s < off_s + n_s)], torch.arange(k) + off_s)
        off_s, off_t = off_s + n_s, off_t + n_t


def naive_fkl(s_row, t_row, T):
    p = torch.softmax(t_row.double() / T, -1)
    lq = torch.log_softmax(s_row.double() / T, -1)
    return sum(float(p[v]) * (math.log(float(p[v])) - float(lq[v])) for v in range(len(p)) if p[v] > 0)


def test_mined_matches_a_naive_loop() -> None:
    recs, tb, cross, targets, s, h_s, head = parts()
    m = MinED(LossSettings(temperature=2.0))
    s2t = torch.randint(-1, V_T, (V_S,))
    m.s2t_vocab = s2t
    got = m.kd_terms(LossInputs(s.float(), h_s, targets, tb, head, nn.ModuleDict(), None, V_S, cross))["kd"]
    t_logits = tb.hidden.double() @ head.weight.double().T
    want = 0.0
    for j in range(len(targets)):
        i = int(cross.mined_t[j])
        if i >= 0:  # teacher logits in the student vocabulary; tokens without a counterpart get no mass
            row = torch.tensor([float(t_logits[i, s2t[v]]) if s2t[v] >= 0 else -1e4 for v in range(V_S)])
        else:  # one-hot ground truth
            row = torch.tensor([0.0 if v == targets[j] else -1e4 for v in range(V_S)])
        want += naive_fkl(s[j].detach(), row, 2.0)
    assert abs(float(got) - want) < 1e-4 * max(1, abs(want))


def test_uld_matches_a_naive_loop() -> None:
    recs, tb, cross, targets, s, h_s, head = parts()
    got = ULD(LossSettings(temperature=1.0)).kd_terms(LossInputs(s, h_s, targets, tb, head, nn.ModuleDict(), None, V_S,
                                                                cross))["kd"]
    want = 0.0
    t_logits = tb.hidden.double() @ head.weight.double().T
    for js, it in zip(cross.uld_s.tolist(), cross.uld_t.tolist()):
        q = sorted(torch.softmax(s[js].detach().double(), -1).tolist(), reverse=True)
        p = sorted(torch.softmax(t_logits[it], -1).tolist(), reverse=True)
        width = max(len(q), len(p))
        q, p = q + [0.0] * (width - len(q)), p + [0.0] * (width - len(p))
        want += sum(abs(a - b) for a, b in zip(q, p))
    assert abs(float(got) - want) < 1e-5
    # zero for identical distributions over vocabularies of different sizes, padded
    x = torch.tensor([[2.0, 1.0, 0.0]])
    assert float(uld_distance(torch.cat([x, torch.tensor([[-1e4]])], -1), x, 1.0)) < 1e-6


@pytest.mark.parametrize("shifted", [False, True])
def test_gold_matches_a_naive_loop(shifted: bool) -> None:
    """At each ETA pair: w * KL over the one-to-one tokens + (1 - w) * sorted L1 over the others, w the
    share of the teacher vocabulary that maps; a teacher id reached twice maps from its first student id.
    At a shifted pair the teacher's logits are read through its space swap."""
    recs, tb, cross, targets, s, h_s, head = parts(shifted)
    s2t = torch.tensor([3, -1, 0, 7, 3, 12, -1, 5, 9, 1, -1])  # student 4 reaches teacher 3 again: not one-to-one
    m = GOLD(LossSettings(temperature=2.0))
    m.s2t_vocab, m.t_swap, m.s_swap = s2t, T_SWAP, S_SWAP
    out = m.kd_terms(LossInputs(s, h_s, targets, tb, head, nn.ModuleDict(), None, V_S, cross))
    t_logits = tb.hidden.double() @ head.weight.double().T
    assert int(cross.eta_shift.sum()) == (2 if shifted else 0)
    pairs = {}
    for v in range(V_S):
        if s2t[v] >= 0 and int(s2t[v]) not in pairs.values():
            pairs[v] = int(s2t[v])
    w = len(pairs) / V_T
    want = 0.0
    for js, it, sh in zip(cross.eta_s.tolist(), cross.eta_t.tolist(), cross.eta_shift.tolist()):
        q = torch.softmax(s[js].detach().double() / 2.0, -1).tolist()
        p = torch.softmax(t_logits[it] / 2.0, -1).tolist()
        if sh:  # the teacher's token t stands for the token T_SWAP[t]
            p = [p[int(T_SWAP[t])] for t in range(V_T)]
        kl = sum(p[t] * math.log(p[t] / q[v]) for v, t in pairs.items())
        rest_q = sorted((q[v] for v in range(V_S) if v not in pairs), reverse=True)
        rest_p = sorted((p[t] for t in range(V_T) if t not in pairs.values()), reverse=True)
        width = max(len(rest_q), len(rest_p))
        rest_q, rest_p = rest_q + [0.0] * (width - len(rest_q)), rest_p + [0.0] * (width - len(rest_p))
        want += w * kl + (1 - w) * sum(abs(a - b) for a, b in zip(rest_q, rest_p))
    assert abs(float(out["kd"].detach()) - want) < 1e-5 * max(1.0, abs(want))
    assert float(out["aligned"]) == len(cross.eta_s) > 0


def test_gold_with_one_vocabulary_is_kd_at_the_pairs() -> None:
    """The same vocabulary on both sides: every token maps, the sorted part is empty, GOLD is forward KL."""
    recs, tb, cross, targets, s, h_s, _ = parts()
    head = TeacherHead(torch.randn(V_S, D_T), None, "hidden")
    m = GOLD(LossSettings(temperature=1.5))
    m.s2t_vocab = torch.arange(V_S)
    got = m.kd_terms(LossInputs(s, h_s, targets, tb, head, nn.ModuleDict(), None, V_S, cross))
    t_logits = head.logits(tb.rows(cross.eta_t))
    want = fkl(s[cross.eta_s], t_logits, temperature=1.5).sum()
    torch.testing.assert_close(got["kd"].double(), want.double(), atol=1e-5, rtol=1e-5)
    assert float(got["unmatched_l1"]) < 1e-6


@pytest.mark.parametrize("tau", [100.0, 10.0])
def test_alm_matches_a_naive_loop(tau: float) -> None:
    """Per chunk: the binary KL between Bernoulli(teacher's chunk likelihood^(1/tau)) and Bernoulli(the
    student's), each likelihood the product of the model's probabilities of its own targets in the
    chunk; chunks with -1 or on one side only do not count; chunk ids are per example."""
    recs = batch()
    recs[0].update(chunk_s=torch.tensor([0, 0, 1, -1, 2]), chunk_t=torch.tensor([0, 1, 1, 3]))  # 2 and 3: one side
    recs[1].update(chunk_s=torch.tensor([0, 1, 1]), chunk_t=torch.tensor([0, 0, -1, 1, 1, -1]))
    tb, cross = _cross_part(recs)
    targets = torch.cat([r["input_ids"][2:] for r in recs])
    s = torch.randn(len(targets), V_S, dtype=torch.float64, requires_grad=True)
    head = TeacherHead(torch.randn(V_T, D_T), None, "hidden")
    out = ALM(LossSettings(alm_tau=tau)).kd_terms(LossInputs(s, torch.zeros(len(targets), D_S), targets, tb, head, nn.ModuleDict(),
                                                  None, V_S, cross))
    t_logits = tb.hidden.double() @ head.weight.double().T
    t_targets = cross.t_targets
    want, n = 0.0, 0
    off_s = off_t = 0
    for r in recs:
        ns, nt = len(r["chunk_s"]), len(r["chunk_t"])
        for c in set(r["chunk_s"].tolist()) & set(r["chunk_t"].tolist()) - {-1}:
            lq = sum(math.log(float(torch.softmax(s[off_s + j].detach(), -1)[targets[off_s + j]]))
                     for j in range(ns) if r["chunk_s"][j] == c)
            lp = sum(math.log(float(torch.softmax(t_logits[off_t + i], -1)[t_targets[off_t + i]]))
                     for i in range(nt) if r["chunk_t"][i] == c)
            p, q = math.exp(lp / tau - 1e-6), math.exp(lq / tau - 1e-6)  # the binarisation temperature
            want += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
            n += 1
        off_s, off_t = off_s + ns, off_t + nt
    assert n == 4 and float(out["chunks"]) == n
    assert abs(float(out["kd"].detach()) - want) < 1e-5 * max(1.0, abs(want))
    out["kd"].backward()
    assert s.grad is not None and float(s.grad[3].abs().sum()) == 0.0  # position 3 is in no chunk


def test_teacher_correct_across_vocabularies_trains_untrusted_positions_on_the_label() -> None:
    """kd_positions = teacher-correct (gold, dskd-eta): KD at the pairs whose teacher top-1 (mapped) is the
    student's target; every other student position adds its CE to the KD sum (the label at full weight)."""
    recs, tb, cross, targets, s, h_s, head = parts()
    cross.eta_label[::2] = targets[cross.eta_s[::2]]  # half of the pairs: the teacher's top-1 is the target
    s2t = torch.tensor([3, -1, 0, 7, 5, 12, -1, 4, 9, 1, 2])
    plain, tc = GOLD(LossSettings(temperature=2.0)), GOLD(LossSettings(temperature=2.0, kd_positions="teacher-correct"))
    plain.s2t_vocab = tc.s2t_vocab = s2t
    x = LossInputs(s, h_s, targets, tb, head, nn.ModuleDict(), None, V_S, cross)
    got = tc.kd_terms(x)
    trusted = {int(j) for j, lab in zip(cross.eta_s, cross.eta_label) if lab == targets[j]}
    assert 0 < len(trusted) < len(cross.eta_s)
    per_pair = {}
    for k, j in enumerate(cross.eta_s.tolist()):  # each pair's GOLD term alone, from the plain method
        one = CrossBatch(**{**cross.__dict__, "eta_s": cross.eta_s[k:k + 1], "eta_t": cross.eta_t[k:k + 1],
                            "eta_shift": cross.eta_shift[k:k + 1],
                            "eta_label": cross.eta_label[k:k + 1]})
        per_pair[j] = float(plain.kd_terms(LossInputs(s, h_s, targets, tb, head, nn.ModuleDict(), None, V_S,
                                                      one))["kd"].detach())
    ce = F.cross_entropy(s.detach().double(), targets, reduction="none")
    want = sum(per_pair[j] for j in trusted) + sum(float(ce[j]) for j in range(len(targets)) if j not in trusted)
    assert abs(float(got["kd"].detach()) - want) < 1e-4 * max(1.0, want)
    assert float(got["kd_kept"]) == len(trusted)
    eta = DSKDETA(LossSettings(kd_positions="teacher-correct"))
    eta.s2t_vocab = s2t
    assert float(eta.kd_terms(x)["kd_kept"]) == len(trusted)


@pytest.mark.parametrize("shifted", [False, True])
def test_eta_matches_a_naive_loop_and_skips_unmapped_tops(shifted: bool) -> None:
    """DSKD at the pairs with a mapped teacher top-1; at a shifted pair the teacher's logits and the t2s
    logits (the teacher's view in the student's vocabulary) are read through the space swaps."""
    recs, tb, cross, targets, s, h_s, head = parts(shifted)
    ls = LossSettings(temperature=2.0, agreement_mask=True)
    proj = build_projectors(D_S, D_T, t2s=True, s2t=True, init="random", seed=0).double()
    w_s = torch.randn(V_S, D_S, dtype=torch.float64)
    m = DSKDETA(ls)
    m.t_swap, m.s_swap = T_SWAP, S_SWAP
    out = m.kd_terms(LossInputs(s, h_s, targets, tb, head, proj, w_s, V_S, cross))
    t2s_ce = t2s_kd = s2t_kd = 0.0
    n = 0
    for j, i, lab, sh in zip(cross.eta_s.tolist(), cross.eta_t.tolist(), cross.eta_label.tolist(),
                             cross.eta_shift.tolist()):
        if lab < 0:
            continue
        n += 1
        t2s_logits = proj["t2s"](tb.hidden[i].double()) @ w_s.T
        t_logits = tb.hidden[i].double() @ head.weight.double().T
        if sh:
            t2s_logits, t_logits = t2s_logits[S_SWAP], t_logits[T_SWAP]
        t2s_ce += float(-torch.log_softmax(t2s_logits, -1)[lab])
        if int(t2s_logits.argmax()) == lab:
            t2s_kd += naive_fkl(s[j].detach(), t2s_logits.detach(), 2.0)
        s2t_logits = proj["s2t"](h_s[j]) @ head.weight.double().T
        s2t_kd += naive_fkl(s2t_logits.detach(), t_logits, 2.0)
    assert n < len(cross.eta_s)  # some tops had no single student token
    assert float(out["aligned"]) == n
    assert abs(float(out["t2s_ce"]) - t2s_ce) < 1e-5
    assert abs(float(out["t2s_kd"]) - t2s_kd) < 1e-5
    assert abs(float(out["s2t_kd"]) - s2t_kd) < 1e-4


def test_cma_matches_per_example_attention() -> None:
    """The batched, masked attention equals attention computed example by example (each student
    position attends only to its own example's teacher positions), for both directions."""
    recs, tb, cross, targets, s, h_s, head = parts()
    ls = LossSettings(temperature=2.0)
    m = DSKDCMA(ls)
    m.norm = {"index_std": 0.7, "target_std": 0.9, "hidden_std": 1.3}
    proj = build_projectors(D_S, D_T, t2s=True, s2t=True, query=True, init="random", seed=0)
    w_s = torch.randn(V_S, D_S)
    e_s = torch.randn(V_S, D_S)
    out = m.kd_terms(LossInputs(s.float(), h_s.float(), targets, tb, head, proj, w_s, V_S, cross, e_s))
    t2s_ce = s2t_kd = 0.0
    for b in range(2):
        js, it = torch.nonzero(cross.seg_s == b).flatten(), torch.nonzero(cross.seg_t == b).flatten()
        q = proj["query"](torch.cat([e_s[cross.s_inputs[js]], e_s[targets[js]]], -1))
        k = torch.cat([head.embed[cross.t_inputs[it]], head.embed[cross.t_targets[it]]], -1) / 0.7
        a = torch.softmax(q @ k.T / math.sqrt(2 * D_T), -1)
        v = proj["t2s"](head.embed[cross.t_targets[it]] / 0.9 + tb.hidden[it] / 1.3)
        logits = (a @ v) @ w_s.T
        t2s_ce += float(F.cross_entropy(logits, targets[js], reduction="sum"))
        a2 = torch.softmax(k @ q.T / math.sqrt(2 * D_T), -1)
        s2t_logits = (a2 @ proj["s2t"](h_s[js].float())) @ head.weight.T
        for r, i in enumerate(it.tolist()):
            s2t_kd += naive_fkl(s2t_logits[r].detach(), tb.hidden[i] @ head.weight.T, 2.0)
    assert abs(float(out["t2s_ce"]) - t2s_ce) < 1e-3
    assert abs(float(out["s2t_kd"]) - s2t_kd) < 1e-3
    # gradients reach the query projector and both projectors, never the teacher's weights
    sum(v for k, v in out.items() if k == "kd").backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())


def test_cross_batch_moves_between_devices() -> None:
    _, _, cross, *_ = parts()
    moved = cross.to(torch.device("meta"))  # another device than the CPU the batch was built on
    assert isinstance(moved, CrossBatch)
    assert all(getattr(moved, f).device.type == "meta" and getattr(moved, f).shape == getattr(cross, f).shape
               for f in CrossBatch.__dataclass_fields__)
    assert cross.eta_s.device.type == "cpu"  # the original is untouched
    assert isinstance(TeacherBatch(hidden=torch.zeros(3, 2)).rows(torch.tensor([2])).hidden, torch.Tensor)


def test_pinv_across_vocabularies_uses_shared_rows() -> None:
    """With rows (student ids, teacher ids) of shared tokens, the t2s projector solves the normal
    equations of W_S[rows_s] X = W_T[rows_t] only over those rows."""
    w_s, w_t = torch.randn(40, D_S), torch.randn(50, D_T)
    rs, rt = torch.arange(0, 40, 2), torch.arange(5, 45, 2)
    proj = build_projectors(D_S, D_T, t2s=True, s2t=True, init="pinv", seed=0, student_head=w_s, teacher_head=w_t,
                            rows=(rs, rt))
    a, b = w_s[rs].double(), w_t[rt].double()
    x = proj["t2s"].weight.double()
    assert torch.allclose(a.T @ (a @ x - b), torch.zeros(D_S, D_T, dtype=torch.float64), atol=1e-3)
    y = proj["s2t"].weight.double()
    assert torch.allclose(b.T @ (b @ y - a), torch.zeros(D_T, D_S, dtype=torch.float64), atol=1e-3)


def test_chunk_starts_pair_the_first_positions_of_chunks_of_more_than_one_token() -> None:
    """Student " 14 apples ab" as [" 14", " apples", " a", "b"], teacher as [" 1", "4", " apples", " ab"]:
    chunks 0 (" 14"), 1 (" apples", an ETA pair) and 2 (" ab"); chunks 0 and 2 begin after the same text.
    A chunk of one token on each side that is not a pair (``▁The`` against ``The``) is no start either."""
    from dskd_batch.train.aligned import chunk_starts

    s, t = chunk_starts(torch.tensor([0, 1, 2, 2, -1]), torch.tensor([0, 0, 1, 2, -1]))
    assert s.tolist() == [0, 2] and t.tolist() == [0, 3]
    s, t = chunk_starts(torch.tensor([0, 1, 1]), torch.tensor([0, 1]))
    assert s.tolist() == [1] and t.tolist() == [1]
    s, t = chunk_starts(torch.tensor([-1, -1]), torch.tensor([-1]))
    assert s.numel() == 0 and t.numel() == 0


def test_eta_span_starts_adds_the_teacher_space_kl_at_the_start_pairs() -> None:
    """kd_positions = span-starts: dskd-eta's terms plus, at each start pair, the KL of the teacher's
    distribution to the student's projected one (float64 loop); the student-space terms unchanged."""
    recs = batch()
    recs[0].update(chunk_s=torch.tensor([0, 0, 1, 2, 3]), chunk_t=torch.tensor([0, 1, 1, 2]))
    recs[1].update(chunk_s=torch.tensor([0, 0, 1]), chunk_t=torch.tensor([0, 1, -1, -1, -1, -1]))
    recs[0]["eta_s"], recs[0]["eta_t"], recs[0]["eta_label"] = torch.tensor([3]), torch.tensor([3]), torch.tensor([4])
    recs[1]["eta_s"], recs[1]["eta_t"], recs[1]["eta_label"] = torch.tensor([2]), torch.tensor([1]), torch.tensor([5])
    tb, cross = _cross_part(recs)
    assert cross.start_s.tolist() == [0, 2, 5] and cross.start_t.tolist() == [0, 1, 4]
    n = len(cross.seg_s)
    targets = torch.cat([r["input_ids"][2:] for r in recs])
    s, h_s = torch.randn(n, V_S, dtype=torch.float64), torch.randn(n, D_S, dtype=torch.float64)
    head = TeacherHead(torch.randn(V_T, D_T), None, "hidden", embed=torch.randn(V_T, D_T))
    proj = build_projectors(D_S, D_T, t2s=True, s2t=True, init="random", seed=0).double()
    w_s = torch.randn(V_S, D_S, dtype=torch.float64)
    x = LossInputs(s, h_s, targets, tb, head, proj, w_s, V_S, cross)
    plain = DSKDETA(LossSettings(temperature=2.0)).kd_terms(x)
    starts = DSKDETA(LossSettings(temperature=2.0, kd_positions="span-starts")).kd_terms(x)
    want = sum(naive_fkl(proj["s2t"](h_s[j]) @ head.weight.double().T, tb.hidden[i].double() @ head.weight.double().T, 2.0)
               for j, i in zip(cross.start_s.tolist(), cross.start_t.tolist()))
    assert float(starts["starts"]) == 3 and abs(float(starts["start_kd"]) - want) < 1e-4 * max(1.0, want)
    assert abs(float(starts["kd"]) - float(plain["kd"]) - want) < 1e-4 * max(1.0, want)
    for k in ("t2s_ce", "t2s_kd", "s2t_kd"):
        assert float(starts[k]) == float(plain[k])

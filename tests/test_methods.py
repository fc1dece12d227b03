"""DSKD and KD terms against naive float64 implementations written here: values, gradients and the
stop-gradients (W_S gets nothing from the projector's CE, W_T is frozen, p_t2s is detached in the
student-space KD term)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dskd_batch.methods import DSKD, LossInputs, LossSettings, TeacherBatch, TeacherHead, VanillaKD, dskd_terms

N, V, DS, DT = 7, 11, 5, 6


def naive_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, T: float) -> torch.Tensor:
    """sum_v p (log p - log q) per row, p = softmax(p_logits / T), in float64, written out."""
    rows = []
    for a, b in zip(p_logits.double(), q_logits.double()):
        pa = torch.exp(a / T) / torch.exp(a / T).sum()
        qb = torch.exp(b / T) / torch.exp(b / T).sum()
        rows.append((pa * (pa.log() - qb.log())).sum())
    return torch.stack(rows)


def naive_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    lg = logits.double()
    return torch.stack([torch.logsumexp(r, 0) - r[t] for r, t in zip(lg, targets)])


def setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g, requires_grad=True)
    h_s = torch.randn(N, DS, generator=g, requires_grad=True)
    h_t = torch.randn(N, DT, generator=g)
    w_s = torch.randn(V, DS, generator=g, requires_grad=True)
    w_t = torch.randn(V, DT, generator=g, requires_grad=True)  # frozen by TeacherHead even so
    targets = torch.randint(0, V, (N,), generator=g)
    torch.manual_seed(seed)
    t2s, s2t = nn.Linear(DT, DS), nn.Linear(DS, DT)
    return s, h_s, h_t, w_s, w_t, targets, t2s, s2t


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("mask", [False, True])
def test_dskd_terms_match_naive(T, mask):
    s, h_s, h_t, w_s, w_t, targets, t2s, s2t = setup()
    head = TeacherHead(w_t, None, "hidden")
    t_logits = h_t @ w_t.detach().T
    t_argmax = t_logits.argmax(-1)
    ls = LossSettings(distance="fkl", temperature=T, agreement_mask=mask)
    terms = dskd_terms(s, h_s, targets, t_logits, h_t, t_argmax, t2s, s2t, w_s, head, ls)

    # naive, float64
    t2s_logits = (h_t.double() @ t2s.weight.double().T + t2s.bias.double()) @ w_s.detach().double().T
    ce_t2s = naive_ce(t2s_logits, targets).sum()
    keep = (t2s_logits.argmax(-1) == t_argmax) if mask else torch.ones(N, dtype=torch.bool)
    kd_student = (naive_kl(t2s_logits.detach(), s, T) * keep).sum()
    s2t_logits = (h_s.double() @ s2t.weight.double().T + s2t.bias.double()) @ w_t.detach().double().T
    kd_teacher = naive_kl(t_logits, s2t_logits, T).sum()
    assert torch.allclose(terms["t2s_ce"].double(), ce_t2s, rtol=1e-5)
    assert torch.allclose(terms["t2s_kd"].double(), kd_student, rtol=1e-5, atol=1e-6)
    assert torch.allclose(terms["s2t_kd"].double(), kd_teacher, rtol=1e-5)
    assert torch.allclose(terms["kd"].double(), ce_t2s + kd_student + kd_teacher, rtol=1e-5)

    got = torch.autograd.grad(terms["kd"], [s, h_s, t2s.weight, s2t.weight], allow_unused=True)
    want = torch.autograd.grad(ce_t2s + kd_student + kd_teacher, [s, h_s, t2s.weight, s2t.weight], allow_unused=True)
    for a, b in zip(got, want):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6)


def test_stop_gradients():
    s, h_s, h_t, w_s, w_t, targets, t2s, s2t = setup(1)
    head = TeacherHead(w_t, None, "hidden")
    t_logits = h_t @ w_t.detach().T
    terms = dskd_terms(s, h_s, targets, t_logits, h_t, t_logits.argmax(-1), t2s, s2t, w_s, head, LossSettings())
    terms["kd"].backward()
    assert w_s.grad is None, "the student head must get no gradient from the projector's CE"
    assert w_t.grad is None, "the teacher head is frozen"
    # the projector t2s is trained by CE_t2s alone: KD_student sees a detached p_t2s
    g_full = t2s.weight.grad.clone()
    t2s.zero_grad()
    t2s_logits = t2s(h_t) @ w_s.detach().T
    torch.nn.functional.cross_entropy(t2s_logits, targets, reduction="sum").backward()
    assert torch.allclose(g_full, t2s.weight.grad, atol=1e-6)


def test_method_objective_and_zero_cases():
    s, h_s, h_t, w_s, w_t, targets, t2s, s2t = setup(2)
    head = TeacherHead(w_t, None, "hidden")
    tb = TeacherBatch(hidden=h_t, argmax=(h_t @ w_t.detach().T).argmax(-1))
    proj = nn.ModuleDict({"t2s": t2s, "s2t": s2t})
    ls = LossSettings(temperature=2.0, kd_rate=0.3)
    out = DSKD(ls).losses(LossInputs(s, h_s, targets, tb, head, proj, w_s, V))
    assert torch.allclose(out["objective"], 0.7 * out["ce"] + 0.3 * out["kd"])

    # vanilla KD: identical distributions give zero KD; objective = (1-r) CE + r KD
    kd = VanillaKD(ls).losses(LossInputs(t_l := (h_t @ w_t.detach().T).requires_grad_(), h_s, targets, tb, head, proj, w_s, V))
    assert float(kd["kd"]) == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(kd["objective"], 0.7 * naive_ce(t_l, targets).sum().float(), rtol=1e-5)

    # an all-masked (empty) batch gives exactly zero for every term
    empty = DSKD(ls).losses(LossInputs(s[:0], h_s[:0], targets[:0], TeacherBatch(hidden=h_t[:0], argmax=targets[:0]), head, proj,
                                       w_s, V))
    assert all(float(v.detach()) == 0.0 for v in empty.values())


def test_ablations_build_only_their_projector():
    assert DSKD(LossSettings(teacher_space=False)).projector_spec() == {"t2s": True, "s2t": False}
    assert DSKD(LossSettings(student_space=False)).projector_spec() == {"t2s": False, "s2t": True}


def test_pinv_init_matches_heads():
    from dskd_batch.train.projectors import build_projectors

    g = torch.Generator().manual_seed(3)
    w_s, w_t = torch.randn(50, 4, generator=g), torch.randn(50, 6, generator=g)
    p = build_projectors(4, 6, t2s=True, s2t=True, init="pinv", seed=0, student_head=w_s, teacher_head=w_t)
    # t2s: W_S X = W_T in least squares -> normal equations W_S^T (W_S X - W_T) = 0
    x = p["t2s"].weight.double()
    assert x.shape == (4, 6)
    assert torch.allclose(w_s.double().T @ (w_s.double() @ x - w_t.double()), torch.zeros(4, 6, dtype=torch.float64), atol=1e-3)
    # when W_T lies in the span of W_S, projected teacher logits equal the teacher's exactly
    w_t2 = w_s @ torch.randn(4, 6, generator=g)
    p2 = build_projectors(4, 6, t2s=True, s2t=False, init="pinv", seed=0, student_head=w_s, teacher_head=w_t2)
    h_t = torch.randn(3, 6, generator=g)
    assert torch.allclose(p2["t2s"](h_t) @ w_s.T, h_t @ w_t2.T, atol=1e-3)


@pytest.mark.parametrize("method", ["kd", "dskd"])
def test_teacher_correct_positions_against_naive(method):
    """kd_positions = teacher-correct: the KD terms only where the teacher's top-1 is the target, the
    label's CE (full weight) elsewhere; with a teacher right everywhere it equals kd_positions = all."""
    s, h_s, h_t, w_s, w_t, targets, t2s, s2t = setup(4)
    head = TeacherHead(w_t, None, "hidden")
    t_logits = h_t @ w_t.detach().T
    t_argmax = t_logits.argmax(-1)
    targets = torch.where(torch.arange(N) % 2 == 0, t_argmax, (t_argmax + 1) % V)  # right at even positions only
    right = targets == t_argmax
    tb = TeacherBatch(hidden=h_t, argmax=t_argmax)
    proj = nn.ModuleDict({"t2s": t2s, "s2t": s2t})
    cls = {"kd": VanillaKD, "dskd": DSKD}[method]
    r, T = 0.7, 2.0
    out = cls(LossSettings(temperature=T, kd_rate=r, kd_positions="teacher-correct")).losses(
        LossInputs(s, h_s, targets, tb, head, proj, w_s, V))

    ce = naive_ce(s, targets)
    if method == "kd":
        want_kd = (naive_kl(t_logits, s, T) * right).sum() + (ce * ~right).sum()
    else:  # the projector's CE (it trains only t2s) stays at every position
        t2s_logits = (h_t.double() @ t2s.weight.double().T + t2s.bias.double()) @ w_s.detach().double().T
        s2t_logits = (h_s.double() @ s2t.weight.double().T + s2t.bias.double()) @ w_t.detach().double().T
        want_kd = naive_ce(t2s_logits, targets).sum() + (ce * ~right).sum() \
            + ((naive_kl(t2s_logits.detach(), s, T) + naive_kl(t_logits, s2t_logits, T)) * right).sum()
    assert torch.allclose(out["kd"].double(), want_kd, rtol=1e-5)
    assert torch.allclose(out["objective"].double(), (1 - r) * ce.sum() + r * want_kd, rtol=1e-5)
    assert float(out["kd_kept"]) == float(right.sum())
    wrt = [s, h_s] if method == "dskd" else [s]
    grads = torch.autograd.grad(out["objective"], wrt)
    want = torch.autograd.grad((1 - r) * ce.sum() + r * want_kd, wrt)
    for a, b in zip(grads, want):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6)

    # a teacher right everywhere: identical to KD on every position
    everywhere = cls(LossSettings(temperature=T, kd_rate=r, kd_positions="teacher-correct")).losses(
        LossInputs(s, h_s, t_argmax, tb, head, proj, w_s, V))
    plain = cls(LossSettings(temperature=T, kd_rate=r)).losses(LossInputs(s, h_s, t_argmax, tb, head, proj, w_s, V))
    assert torch.allclose(everywhere["objective"], plain["objective"], rtol=1e-6)
    assert "kd_kept" not in plain

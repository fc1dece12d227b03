"""DSKD projectors between the student's and the teacher's hidden spaces.

``t2s`` maps teacher hidden states [.., d_T] into the student's space [.., d_S]; ``s2t`` maps the
student's into the teacher's. Both are affine maps (``nn.Linear`` with bias), as in the papers.
CMA adds ``query`` [2 d_S -> 2 d_T], the query projector of the cross-model attention.

Initialisation:

- ``random``: PyTorch's default for ``nn.Linear`` (first paper), from a seeded generator.
- ``pinv``: least squares in fp32 so projected logits match the other model's own logits over the
  rows both heads share (extended paper): ``h_T t2s^T W_S^T ~ h_T W_T^T`` for every h_T, i.e.
  ``W_S X = W_T`` in the least-squares sense, X = t2s.weight [d_S, d_T]; likewise
  ``W_T Y = W_S`` for s2t.weight Y [d_T, d_S]. Biases start at zero. ``rows`` gives the pairs of
  (student row, teacher row) to match: every row for one vocabulary; the tokens whose text both
  vocabularies share across tokenizers.
"""

from __future__ import annotations

import torch
from torch import nn

PROJECTOR_FILE = "projectors.safetensors"


def lstsq_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """X minimising ||a X - b|| (fp32, a [V, d_a], b [V, d_b]) -> X [d_a, d_b]."""
    return torch.linalg.lstsq(a.double(), b.double()).solution.float()


def build_projectors(d_s: int, d_t: int, *, t2s: bool, s2t: bool, init: str, seed: int, query: bool = False,
                     student_head: torch.Tensor | None = None, teacher_head: torch.Tensor | None = None,
                     rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.ModuleDict:
    """The projectors a method needs, initialised as asked (see the module docstring)."""
    mods = nn.ModuleDict()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if t2s:
            mods["t2s"] = nn.Linear(d_t, d_s)
        if s2t:
            mods["s2t"] = nn.Linear(d_s, d_t)
        if query:
            mods["query"] = nn.Linear(2 * d_s, 2 * d_t)
    finally:
        torch.random.set_rng_state(gen_state)
    if init == "pinv" and len(mods):
        if student_head is None or teacher_head is None:
            raise ValueError("pinv initialisation needs both heads")
        ws, wt = student_head.detach().float().cpu(), teacher_head.detach().float().cpu()
        if rows is not None:
            ws, wt = ws[rows[0]], wt[rows[1]]
        with torch.no_grad():
            if "t2s" in mods:
                mods["t2s"].weight.copy_(lstsq_map(ws, wt))
                mods["t2s"].bias.zero_()
            if "s2t" in mods:
                mods["s2t"].weight.copy_(lstsq_map(wt, ws))
                mods["s2t"].bias.zero_()
    return mods

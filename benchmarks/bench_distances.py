"""Time of each KD distance (forward + backward) on one loss chunk, side by side in one run.

    python benchmarks/bench_distances.py [--cache demo-out/cache] [--positions 341] [--temperature 2]
        [--results FILE]

Teacher logits: a real cache's (``--cache``, read back exactly from its hidden states or top-k,
positions drawn over the whole cache) or, without one, synthetic logits over V = 49,152 whose
top-1 probability at T = 1 is near 1 but whose tail is flat, so that AKL's head at T = 2 is far
longer than a tuned teacher's (a hard case for AKL's top-k). Student logits: the teacher's plus
noise. One chunk of ``--positions`` positions (341: the auto chunk of DSKD at V = 49k), on one
thread, the best of ``--repeats`` runs of each. Beside the registry's distances it times AKL as
the formula was first written here (a full sort of the vocabulary per position), so the ratio of
the two is measured in the same run. Prints milliseconds, the ratio to FKL, and the length of
AKL's head (the tokens it weighs with FKL) at that temperature.
"""

from __future__ import annotations

import argparse
import time

import torch

from dskd_batch.losses import DISTANCES, _logp


def akl_sorted(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0, akl_alpha: float = 0.5) -> torch.Tensor:
    """AKL with a full sort of p: the reference the registry's version is measured against."""
    lp, lq = _logp(t, temperature), _logp(s, temperature)
    p, q = lp.exp(), lq.exp()
    p_sorted, order = p.sort(dim=-1)
    gap = (p_sorted - q.gather(-1, order)).abs().detach()
    tail = (p_sorted.cumsum(-1) < akl_alpha).float()
    g_tail, g_head = (gap * tail).sum(-1), (gap * (1 - tail)).sum(-1)
    denom = (g_head + g_tail).clamp_min(1e-12)
    fkl = (p * (lp - lq)).sum(-1)
    rkl = (q * (lq - lp)).sum(-1)
    return (g_head / denom) * fkl + (g_tail / denom) * rkl


def teacher_logits(cache: str | None, positions: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if cache is None:
        t = torch.randn(positions, 49152, generator=g) * 2
        t[torch.arange(positions), torch.randint(0, 49152, (positions,), generator=g)] += 22
        return t
    from dskd_batch.cache.reader import TeacherCache

    c = TeacherCache(cache)
    rows = []
    for i in torch.randperm(len(c), generator=g).tolist():
        rows.append(c.teacher_logits(c[i]).float())
        if sum(len(r) for r in rows) >= positions:
            break
    return torch.cat(rows)[:positions]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--positions", type=int, default=341)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=None, help="keep the figures as JSON (for benchmarks/render_docs.py)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    t = teacher_logits(a.cache, a.positions, a.seed)
    g = torch.Generator().manual_seed(a.seed + 1)
    s = t + torch.randn(t.shape, generator=g) * 2
    p = torch.softmax(t / a.temperature, -1)
    v = p.sort(-1, descending=True).values
    head = ((v.cumsum(-1) - v) <= 0.5).sum(-1).float()
    top1 = torch.softmax(t, -1).max(-1).values.mean()
    print(f"teacher: {a.cache or 'synthetic'}, {t.shape[0]} positions x V = {t.shape[1]}, mean top-1 probability "
          f"at T = 1: {top1:.3f}; AKL head at T = {a.temperature:g}: mean {head.mean():.1f}, max {head.max():.0f} tokens")
    times: dict[str, float] = {}
    for name, f in [*DISTANCES.items(), ("akl (full sort)", akl_sorted)]:
        best = float("inf")
        for _ in range(a.repeats):
            x = s.clone().requires_grad_()
            start = time.perf_counter()
            f(x, t, temperature=a.temperature).sum().backward()
            best = min(best, time.perf_counter() - start)
        times[name] = best
    print("| distance | ms (forward + backward) | x FKL |")
    print("|---|---|---|")
    for name, sec in times.items():
        print(f"| {name} | {sec * 1000:.0f} | {sec / times['fkl']:.2f} |")
    print(f"AKL (top-k head) against AKL (full sort): {times['akl (full sort)'] / times['akl']:.2f}x faster")
    if a.results is not None:
        import json
        from pathlib import Path

        from seed_table import provenance  # beside this script, on sys.path when it runs

        doc = {**provenance(), "teacher": a.cache or "synthetic", "positions": t.shape[0], "vocab": t.shape[1],
               "temperature": a.temperature, "top1_at_t1": float(top1), "akl_head_mean": float(head.mean()),
               "akl_head_max": float(head.max()), "threads": 1, "repeats": a.repeats,
               "ms": {name: sec * 1000 for name, sec in times.items()}}
        Path(a.results).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"results: {a.results}")


if __name__ == "__main__":
    main()

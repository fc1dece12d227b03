"""The repository speaks of the product: no development history in what users read (README, docs,
Justfile, pipeline files, help texts), and the docs' Python example runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
HISTORY = re.compile(r"\b(sessions?|sprints?|superseded|target (?:met|missed)|issue\s*#?\d+|development rounds?|"
                     r"(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth) "
                     r"(?:session|round)'?s?)\b", re.IGNORECASE)


def _user_texts() -> dict[str, str]:
    from dskd_batch.cli import main

    texts = {str(p.relative_to(ROOT)): p.read_text() for p in
             [ROOT / "README.md", ROOT / "Justfile", *ROOT.glob("docs/**/*.md"), *ROOT.glob("pipelines/*.toml"),
              *ROOT.glob("benchmarks/*.toml")]}
    for name in main.list_commands(None):  # type: ignore[arg-type]
        texts[f"dskd-batch {name} --help"] = CliRunner().invoke(main, [name, "--help"]).output
    return texts


def history_words(text: str) -> list[str]:
    return [m.group(0) for m in HISTORY.finditer(text)]


def test_no_development_history_in_what_users_read() -> None:
    found = {where: history_words(t) for where, t in _user_texts().items()}
    assert not {k: v for k, v in found.items() if v}


@pytest.mark.parametrize("line", ["measured in the eleventh session", "target met", "as issue 12 asked",
                                  "the superseded row", "Sessions of work"])
def test_the_history_check_catches(line: str) -> None:
    assert history_words(f"Some docs.\n{line}\nMore docs.")


def test_pytest_words_are_fine() -> None:
    assert not history_words('@pytest.fixture(scope="module")\nrun the issue tracker')


def test_readme_is_short_and_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for target in re.findall(r"\]\(((?:docs/|CHANGELOG)[^)#]*)", readme):
        assert (ROOT / target).exists(), target


def test_the_api_example_runs(llama_teacher, gpt2_student, corpus, tmp_path, monkeypatch) -> None:
    """docs/api.md's example, on the tiny models: placeholders replaced, nothing else."""
    text = (ROOT / "docs" / "api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = (code.replace('"TEACHER"', repr(str(llama_teacher))).replace('"STUDENT"', repr(str(gpt2_student)))
            .replace('"train.jsonl"', repr(str(corpus))).replace('"test.jsonl"', repr(str(corpus))))
    code = code.replace('out="runs/kd")', 'out="runs/kd", max_steps=2, batch_size=2, device="cpu")')
    code = code.replace('data="test.jsonl")', 'data="test.jsonl")')
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace("EvalConfig(model=str(run), data=" + repr(str(corpus)) + ")",
                              "EvalConfig(model=str(run), data=" + repr(str(corpus)) + ", seeds='1', limit=2, "
                              "max_new_tokens=4, device='cpu')"), "docs/api.md", "exec"), scope)
    assert (tmp_path / "cache" / "manifest.json").exists() and (tmp_path / "runs" / "kd" / "student").exists()
    assert set(scope["record"]) >= {"input_ids", "positions", "hidden", "topk_values"}


def test_benchmark_tables_are_rendered_from_the_results_json() -> None:
    """The docs pages' marked tables equal what benchmarks/render_docs.py makes of
    benchmarks/results/*.json (run it after a benchmark); every table is on a page."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "benchmarks" / "render_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    texts = [page.read_text() for page in mod.PAGES]
    assert sum(text.count("<!-- table:") for text in texts) == len(mod.TABLES)
    for text in texts:
        assert mod.render(text) == text

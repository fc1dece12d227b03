"""Extension points: a distance with its own hyper-parameter, and a method, added by an installed
package through entry points (no edit of dskd_batch), used from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import subprocess_env

from dskd_batch.config import DistillConfig
from dskd_batch.errors import DskdError

PLUGIN = '''
"""A user's package: one distance, one method."""
from dskd_batch.losses import fkl
from dskd_batch.methods import VanillaKD


def scaled_fkl(s, t, temperature=1.0, weight=0.5):
    return weight * fkl(s, t, temperature=temperature)


scaled_fkl.bounds = {"weight": (0.0, 10.0)}


class HalfKD(VanillaKD):
    """KD whose KD term counts half."""
    name = "half-kd"

    def combine(self, ce, terms):
        terms["kd"] = 0.5 * terms["kd"]
        return super().combine(ce, terms)
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A package 'installed' the way pip leaves it: the module and its .dist-info with entry points."""
    root = tmp_path_factory.mktemp("site")
    (root / "my_kd_plugin.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "my_kd_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-kd-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dskd_batch.distances]\nscaled-fkl = my_kd_plugin:scaled_fkl\n\n"
                                           "[dskd_batch.methods]\nhalf-kd = my_kd_plugin:HalfKD\n")
    return root


def _cli(args: list[str], plugin: Path | None) -> subprocess.CompletedProcess:
    env = subprocess_env()
    if plugin is not None:
        env["PYTHONPATH"] = f"{plugin}:{env['PYTHONPATH']}"
    return subprocess.run([sys.executable, "-m", "dskd_batch", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _first_step(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


def test_plugin_distance_and_method_from_the_command_line(plugin_path, fp32_cache, gpt2_student, tmp_path):
    listed = _cli(["distances"], plugin_path)
    assert listed.returncode == 0 and "scaled-fkl" in listed.stdout and "weight=0.5" in listed.stdout
    assert "scaled-fkl" not in _cli(["distances"], None).stdout  # nothing without the package
    common = ["--cache", str(fp32_cache), "--student", str(gpt2_student), "--max-steps", "1", "--batch-size", "2",
              "--device", "cpu", "--lr", "1e-3", "--temperature", "2.0"]
    runs = {}
    for name, extra in {"fkl": ["--method", "kd"],
                        "scaled": ["--method", "kd", "--distance", "scaled-fkl", "--distance-arg", "weight=0.25"],
                        "half": ["--method", "half-kd"]}.items():
        p = _cli(["distill", "--out", str(tmp_path / name), *common, *extra], plugin_path)
        assert p.returncode == 0, p.stderr[-2000:]
        runs[name] = _first_step(tmp_path / name)
    # the first step sees the same student and batch: the plug-ins' terms are exact multiples of FKL
    assert runs["scaled"]["kd"] == pytest.approx(0.25 * runs["fkl"]["kd"], rel=1e-5)
    assert runs["half"]["kd"] == pytest.approx(0.5 * runs["fkl"]["kd"], rel=1e-5)
    assert runs["half"]["ce"] == pytest.approx(runs["fkl"]["ce"], rel=1e-6)
    info = json.loads((tmp_path / "scaled" / "run.json").read_text())
    assert info["config"]["distance"] == "scaled-fkl" and info["config"]["distance_arg"] == ["weight=0.25"]
    bad = _cli(["distill", "--out", str(tmp_path / "bad"), *common, "--method", "kd", "--distance", "scaled-fkl",
                "--distance-arg", "weight=20"], plugin_path)
    assert bad.returncode == 2 and "scaled-fkl weight must be in (0, 10), got 20.0" in bad.stderr


def test_distance_args_checked_against_the_signature(gpt2_student, fp32_cache, tmp_path):
    base = dict(student=str(gpt2_student), out=str(tmp_path / "r"), cache=str(fp32_cache), method="kd")
    assert DistillConfig(**base, distance="skl", distance_arg=("skew_lambda=0.3",)).distance_args == {"skew_lambda": 0.3}
    assert DistillConfig(**base, distance="akl", distance_arg={"akl_alpha": 0.7}).distance_args == {"akl_alpha": 0.7}
    assert DistillConfig(**base, distance="akl").distance_args == {}  # the function's own default applies
    with pytest.raises(DskdError) as e:
        DistillConfig(**base, distance="fkl", distance_arg=("skew_lambda=0.3",))
    assert "distance fkl has no hyper-parameter 'skew_lambda' (it takes: none)" in str(e.value)
    with pytest.raises(DskdError, match=r"skl skew_lambda must be in \(0, 1\), got 1.5"):
        DistillConfig(**base, distance="skl", distance_arg=("skew_lambda=1.5",))
    with pytest.raises(DskdError, match="akl akl_alpha must be a float, got 'high'"):
        DistillConfig(**base, distance="akl", distance_arg=("akl_alpha=high",))


def test_distance_arg_reaches_the_loss(fp32_cache, gpt2_student, tmp_path):
    """skew_lambda set from the config changes SKL's value as the function computes it."""
    from dskd_batch.train.distill import run

    vals = {}
    for lam in (0.1, 0.6):
        out = run(DistillConfig(student=str(gpt2_student), out=str(tmp_path / f"l{lam}"), cache=str(fp32_cache),
                                method="kd", distance="skl", distance_arg=(f"skew_lambda={lam}",), max_steps=1,
                                batch_size=2, device="cpu"))
        vals[lam] = _first_step(out)["kd"]
    assert vals[0.1] != pytest.approx(vals[0.6], rel=1e-3)

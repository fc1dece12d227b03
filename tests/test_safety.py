"""What the toolkit loads is data, not code: checkpoints' optimizer and RNG state load with
``weights_only=True``, and a pickle that would run code is refused before it runs."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dskd_batch.cache.format import atomic_write_json, file_table
from dskd_batch.config import DistillConfig
from dskd_batch.train.distill import run
from dskd_batch.errors import DskdError
from dskd_batch.train.checkpoint import load_state_file, rng_state, set_rng_state

PACKAGE = Path(__file__).resolve().parents[1] / "dskd_batch"


def _cfg(student: Path, out: Path, **kw) -> DistillConfig:
    base = dict(student=str(student), out=str(out), batch_size=2, grad_accum=1, lr=1e-3, projector_lr=1e-3,
                max_steps=2, save_steps=1, device="cpu", lr_schedule="constant", method="kd")
    base.update(kw)
    return DistillConfig(**base)


class _WritesAFile:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "unpickling ran code"))


def test_every_torch_load_is_weights_only() -> None:
    calls = []
    for f in PACKAGE.rglob("*.py"):
        for m in re.finditer(r"torch\.load\(([^)]*)\)", f.read_text()):
            calls.append((f.name, m.group(1)))
    assert all("weights_only" not in args or "weights_only=True" in args for _, args in calls)
    assert all("weights_only=False" not in f.read_text() for f in PACKAGE.rglob("*.py"))


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path) -> None:
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    torch.save([rng_state()], tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(load_state_file(tmp_path / "rng.pt")[0])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert want[0] == got[0] and want[1] == got[1] and torch.equal(want[2], got[2])


def test_a_checkpoint_whose_optimizer_state_runs_code_is_refused(fp32_cache, gpt2_student, tmp_path) -> None:
    out = run(_cfg(gpt2_student, tmp_path / "run", cache=str(fp32_cache)))
    ck = sorted((out / "checkpoints").iterdir())[-1]
    marker = tmp_path / "marker.txt"
    torch.save({"optimizer": _WritesAFile(marker), "scheduler": {}}, ck / "optim.pt")
    state = __import__("json").loads((ck / "state.json").read_text())
    state["files"] = file_table(ck)  # checksums that match: the file was swapped by someone who could write them
    del state["files"]["state.json"]
    atomic_write_json(ck / "state.json", state)
    with pytest.raises(DskdError, match=r"optim.pt holds Python objects .* not loaded: unpickling them could run code"):
        run(_cfg(gpt2_student, tmp_path / "run", cache=str(fp32_cache), resume=True))
    assert not marker.exists()
    # the real thing written by this version resumes
    torch.save({"x": torch.zeros(1)}, tmp_path / "plain.pt")
    assert torch.equal(load_state_file(tmp_path / "plain.pt")["x"], torch.zeros(1))


def test_an_older_rng_file_with_numpy_objects_is_refused(tmp_path) -> None:
    torch.save([{"numpy": np.random.get_state()}], tmp_path / "rng.pt")
    with pytest.raises(DskdError, match="rng.pt holds Python objects") as e:
        load_state_file(tmp_path / "rng.pt")
    assert "older dskd-batch" in str(e.value)


# -- pass@1's sandbox ---------------------------------------------------------------------------------

PROBLEM = {"prompt": "def f(x):\n", "test": "def check(fn):\n    assert fn(2) == 4\n", "entry_point": "f"}
GOOD = "    return x * 2\n"


def _hostile(body: str) -> str:
    """A completion that does ``body`` and then returns the right answer: it scores 100 only if
    ``body`` did not raise (and the process survived)."""
    return "".join(f"    {line}\n" for line in body.strip().splitlines()) + GOOD


@pytest.fixture()
def host_file(tmp_path) -> Path:
    f = tmp_path / "precious.txt"
    f.write_text("keep me")
    return f


def _hostile_cases(host: Path, marker: Path) -> dict[str, str]:
    return {
        "remove a file outside": f"import os\nos.remove({str(host)!r})",
        "remove it through pathlib": f"import pathlib\npathlib.Path({str(host)!r}).unlink()",
        "truncate it by opening for writing": f"open({str(host)!r}, 'w').write('gone')",
        "rmtree its folder": f"import shutil\nshutil.rmtree({str(host.parent)!r})",
        "start a subprocess": f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}])",
        "os.system": f"import os\nos.system('touch {marker}')",
        "fork in a loop": "import os\nwhile True:\n    os.fork()",
        "multiprocessing": "import multiprocessing\nmultiprocessing.Process(target=print).start()",
        "ctypes fork": "import ctypes\nctypes.CDLL(None).fork()",
        "open a socket": "import socket\nsocket.create_connection(('127.0.0.1', 9))",
        "a raw socket": "import _socket\n_socket.socket()",
        "write 1 GB": "with open('big.bin', 'wb') as f:\n    for _ in range(1024):\n        f.write(b'x' * 2**20)",
        "print 1 GB": "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)",
        "loop forever": "while True:\n    pass",
        "read the parent's environment": "import os\nassert 'DSKD_SECRET' in os.environ",
        "read it from /proc": "import os\nassert b'DSKD_SECRET' in open(f'/proc/{os.getppid()}/environ', 'rb').read()",
        "raise its own limits": "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (10**6, 10**6))",
        "exhaust memory": "x = bytearray(4 * 2**30)",
    }


def test_pass_at_1_sandbox_stops_hostile_completions(host_file, tmp_path, monkeypatch) -> None:
    from dskd_batch.eval.scoring import pass_at_1

    monkeypatch.setenv("DSKD_SECRET", "hunter2")
    marker = tmp_path / "ran.txt"
    assert pass_at_1(PROBLEM, GOOD) == 100.0
    for name, body in _hostile_cases(host_file, marker).items():
        score = pass_at_1(PROBLEM, _hostile(body), timeout=3)
        assert score == 0.0, name
        assert host_file.read_text() == "keep me", name
        assert not marker.exists(), name
        assert pass_at_1(PROBLEM, GOOD) == 100.0, f"scoring goes on after: {name}"


def test_sandbox_leaves_nothing_running_and_cleans_up(tmp_path) -> None:
    import time

    from dskd_batch.eval.sandbox import Limits, run_untrusted

    t = time.perf_counter()
    r = run_untrusted("while True:\n    pass\n", Limits(timeout=1))
    assert r.returncode is None and time.perf_counter() - t < 8
    r = run_untrusted("import os\nprint(os.getcwd(), os.environ.get('HOME'), sorted(os.environ))\n")
    cwd, home = r.stdout.split()[:2]
    assert r.passed and cwd == home and not Path(cwd).exists()  # its own folder, deleted afterwards
    assert "['HOME', 'LANG', 'PATH', 'PYTHONDONTWRITEBYTECODE', 'PYTHONHASHSEED', 'TMPDIR']" in r.stdout
    # inside its folder it may work normally
    r = run_untrusted("import os\nopen('a.txt', 'w').write('x')\nos.rename('a.txt', 'b.txt')\nos.remove('b.txt')\n"
                      "print('ok')\n")
    assert r.passed and r.stdout.strip() == "ok", r.stderr

"""A teacher served over HTTP: :func:`serve` puts any :class:`~dskd_batch.teacher.source.Teacher`
behind a small standard-library server, and :class:`HTTPTeacher` (``--teacher http://HOST:PORT``)
is the client that stage one, the live stage and on-policy use like a local teacher.

The wire is plain: ``GET /describe`` (JSON: the description, the model configuration),
``GET /tokenizer`` (a zip of the tokenizer's files), ``GET /head`` (the head and embeddings as
safetensors) and ``POST /forward`` (JSON token ids, positions, ``keep_logits`` and ``top_k`` in;
the batch's outputs as safetensors out: fp32 stays fp32, so a cache made through the server holds
the same numbers as one made in-process). ``POST /generate`` samples responses. A serving engine
that returns hidden states at chosen positions plugs in the same way: answer these four requests.
"""

from __future__ import annotations

import io
import json
import tempfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.request import Request, urlopen

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import DskdError
from .forward import PendingRecords
from .source import Teacher

TIMEOUT_S = 600.0


class HTTPTeacher(Teacher):
    """The client of :func:`serve` (see the module docstring)."""

    def __init__(self, url: str, *, top_k: int = 0, **_: Any) -> None:
        self.spec, self.url, self.top_k = url, url.rstrip("/"), top_k
        info = json.loads(self._get("/describe"))
        self._describe, self._config = info["describe"], info["config"]
        self._tok: Any = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def _request(self, path: str, body: bytes | None = None) -> bytes:
        req = Request(self.url + path, data=body, headers={"Content-Type": "application/json"} if body else {})
        try:
            with urlopen(req, timeout=TIMEOUT_S) as r:
                return r.read()
        except URLError as e:
            raise DskdError(f"--teacher {self.spec}: {path} failed ({getattr(e, 'reason', e)})",
                            hint="is the teacher server running (`dskd-batch serve-teacher`)?") from None

    def _get(self, path: str) -> bytes:
        return self._request(path)

    @property
    def tokenizer(self) -> Any:
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tmp = tempfile.TemporaryDirectory(prefix="dskd-teacher-tok-")
            zipfile.ZipFile(io.BytesIO(self._get("/tokenizer"))).extractall(self._tmp.name)
            self._tok = AutoTokenizer.from_pretrained(self._tmp.name)
        return self._tok

    def describe(self) -> dict[str, Any]:
        return dict(self._describe)

    def head_and_embeddings(self) -> dict[str, torch.Tensor]:
        return st_load(self._get("/head"))

    def config_json(self) -> str:
        return self._config

    def launch(self, sequences: list[list[int]], *, positions: list[list[int]] | None = None,
               keep_logits: bool | list[bool] = False) -> PendingRecords:
        if positions is None:
            positions = [list(range(len(s))) for s in sequences]
        body = json.dumps({"sequences": [list(map(int, s)) for s in sequences],
                           "positions": [list(map(int, p)) for p in positions],
                           "keep_logits": keep_logits, "top_k": self.top_k}).encode()
        host = st_load(self._request("/forward", body))
        return PendingRecords([torch.as_tensor(p, dtype=torch.long) for p in positions], self.top_k, host, None)

    def generate(self, prompts: list[list[int]], *, settings: Any, max_new: list[int]) -> list[list[int]]:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())  # drawn from the caller's seeded generator
        body = json.dumps({"prompts": prompts, "max_new": max_new, "seed": seed,
                           "settings": {"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                                        "top_p": settings.top_p}}).encode()
        return json.loads(self._request("/generate", body))

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _zip_tokenizer(tok: Any) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for f in sorted(Path(d).iterdir()):
                z.write(f, f.name)
        return buf.getvalue()


def serve(teacher: Teacher, host: str = "127.0.0.1", port: int = 0) -> HTTPServer:
    """Serve ``teacher`` (one request at a time: the model is not shared between threads) on a
    background thread; ``port`` 0 picks a free one (``server.server_address``). Stop it with
    ``server.shutdown()``."""
    from ..generation import SamplingSettings

    static = {"/describe": json.dumps({"describe": teacher.describe(), "config": teacher.config_json()}).encode(),
              "/tokenizer": _zip_tokenizer(teacher.tokenizer), "/head": st_save(teacher.head_and_embeddings())}

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, data: bytes, kind: str = "application/octet-stream") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - the http.server interface
            if self.path in static:
                self._send(200, static[self.path])
            else:
                self._send(404, b"unknown path", "text/plain")

        def do_POST(self) -> None:  # noqa: N802
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            try:
                if self.path == "/forward":
                    teacher.top_k = int(req["top_k"])
                    pending = teacher.launch(req["sequences"], positions=req["positions"],
                                             keep_logits=req["keep_logits"])
                    pending.wait()
                    host = {k: (v if isinstance(v, torch.Tensor) else torch.tensor(v)).contiguous()
                            for k, v in pending.host.items()}
                    self._send(200, st_save(host))
                elif self.path == "/generate":
                    torch.manual_seed(int(req["seed"]))
                    s = req["settings"]
                    out = teacher.generate(req["prompts"], max_new=req["max_new"], settings=SamplingSettings(
                        s["max_new_tokens"], s["temperature"], s["top_p"]))
                    self._send(200, json.dumps(out).encode(), "application/json")
                else:
                    self._send(404, b"unknown path", "text/plain")
            except Exception as e:  # the client sees one clear line
                self._send(500, f"{type(e).__name__}: {e}".encode(), "text/plain")

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server

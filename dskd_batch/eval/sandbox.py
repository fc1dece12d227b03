"""Running model-written code for pass@1: a fresh interpreter with limits, and the destructive calls
taken away before the code runs.

What :func:`run_untrusted` does, in this order:

- the program runs in a new Python (``-I``: no user site, no ``PYTHON*`` variables) in a new
  process group, in an empty temporary folder that is also its home and temp folder, with a scrubbed
  environment (``PATH``, ``HOME``, ``TMPDIR``, ``LANG``, ``PYTHONHASHSEED`` only) and no stdin;
  its stdout and stderr go to files in that folder;
- before the program's first line: resource limits on CPU seconds, address space, file size,
  open files and processes (``RLIMIT_*``), then the ``resource`` module is made unimportable;
  the network is gone (``socket``/``_socket`` constructors raise); processes cannot be started
  (``os.fork``/``system``/``exec*``/``spawn*``/``popen``, ``subprocess``, ``_posixsubprocess``,
  ``multiprocessing``, ``pty``); files outside the folder cannot be removed, renamed, truncated,
  re-permissioned or opened for writing, and other processes' ``/proc`` entries (a parent's
  environment) cannot be read; ``ctypes``/``cffi`` and a few introspection-heavy modules cannot
  be imported;
- the parent waits at most ``timeout`` seconds (wall), then kills its whole process group, and kills
  whatever the program left behind in any case. The folder is deleted afterwards.

It is not a container: the process runs as the same user, with the same view of the file system
for reading, and a determined program can get at the originals of what was taken away (they are
reachable through the interpreter's internals). It stops the accidents and the usual destructive
calls of generated code, as the HumanEval and EvalPlus harnesses do; run evaluation of untrusted
models inside a container or VM as well.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_PRELUDE = r'''
import builtins, io, os, resource, sys
_ROOT = os.path.realpath(os.getcwd())
for _lim, _val in ((resource.RLIMIT_CPU, {cpu}), (resource.RLIMIT_AS, {mem}), (resource.RLIMIT_FSIZE, {fsize}),
                   (resource.RLIMIT_NOFILE, {nofile}), (resource.RLIMIT_NPROC, {nproc}), (resource.RLIMIT_CORE, 0)):
    try:
        resource.setrlimit(_lim, (_val, _val))
    except (ValueError, OSError):
        pass
del resource, _lim, _val
for _name in ("resource", "ctypes", "_ctypes", "cffi", "_cffi_backend", "pty", "multiprocessing", "_multiprocessing",
              "_posixshmem", "gc", "psutil"):
    sys.modules[_name] = None

def _denied(*a, **k):
    raise PermissionError("disabled while scoring generated code")

import socket, _socket
for _mod in (socket, _socket):
    for _name in ("socket", "socketpair", "create_connection", "create_server", "fromfd", "getaddrinfo",
                  "gethostbyname", "SocketType"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _denied)
import posix, shutil, subprocess, _posixsubprocess
for _mod in (os, posix):
    for _name in ("system", "fork", "forkpty", "vfork", "kill", "killpg", "popen", "spawnl", "spawnle", "spawnlp",
                  "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp",
                  "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe", "setuid", "setgid",
                  "seteuid", "setegid", "setreuid", "setregid", "putenv", "unsetenv", "chroot", "fchdir", "chdir",
                  "register_at_fork", "setrlimit", "prlimit", "fchmod", "fchown", "lchmod", "lchown", "mkfifo",
                  "mknod", "symlink", "link", "removedirs", "renames"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _denied)
_posixsubprocess.fork_exec = _denied
for _name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    setattr(subprocess, _name, _denied)
for _name in ("rmtree", "move", "chown", "disk_usage"):
    setattr(shutil, _name, _denied)

def _real(path):
    return os.path.realpath(os.fsdecode(path))

def _inside(path):
    if isinstance(path, int):
        return True
    p = _real(path)
    return p == _ROOT or p.startswith(_ROOT + os.sep)

def _other_process(path):
    if isinstance(path, int):
        return False
    parts = _real(path).split("/")
    return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and int(parts[2]) != os.getpid()

def _guard_open(fn):
    def guarded(path, mode="r", *a, **k):
        if _other_process(path):
            raise PermissionError(f"{{path}}: another process's entries cannot be read while scoring")
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else \
            bool(mode & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        if writes and not _inside(path):
            raise PermissionError(f"{{path}}: outside the scoring folder")
        return fn(path, mode, *a, **k)
    return guarded

def _guard_change(fn):
    def guarded(*a, **k):
        for path in a[:2]:
            if isinstance(path, (str, bytes, os.PathLike)) and not _inside(path):
                raise PermissionError(f"{{path}}: outside the scoring folder")
        return fn(*a, **k)
    return guarded

builtins.open = io.open = _guard_open(io.open)
os.open = posix.open = _guard_open(os.open)
for _mod in (os, posix):
    for _name in ("remove", "unlink", "rmdir", "rename", "replace", "truncate", "chmod", "chown", "utime", "mkdir"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _guard_change(getattr(_mod, _name)))
del _mod, _name, posix, _posixsubprocess
sys.argv = ["program.py"]
_source = builtins.open("program.py").read()
exec(compile(_source, "program.py", "exec"), {{"__name__": "__main__", "__builtins__": builtins}})
'''


@dataclass(frozen=True)
class Limits:
    """What a generated program may use."""

    timeout: float = 10.0  # wall seconds
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # the largest file it may write (its stdout and stderr included)
    open_files: int = 64
    processes: int = 1  # RLIMIT_NPROC (not enforced for root: forks are also disabled in Python)


@dataclass(frozen=True)
class Outcome:
    returncode: int | None  # None: killed at the wall timeout
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.returncode == 0


def run_untrusted(program: str, limits: Limits = Limits()) -> Outcome:
    """Run ``program`` (Python source) in the sandbox described in the module docstring."""
    with tempfile.TemporaryDirectory(prefix="dskd-sandbox-") as d:
        with open(os.path.join(d, "program.py"), "w") as f:
            f.write(program)
        with open(os.path.join(d, "_run.py"), "w") as f:
            f.write(_PRELUDE.format(cpu=max(1, int(limits.timeout) + 1), mem=limits.memory_mb * 2**20,
                                    fsize=limits.file_mb * 2**20, nofile=limits.open_files, nproc=limits.processes))
        env = {"PATH": "/usr/bin:/bin", "HOME": d, "TMPDIR": d, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1"}
        out_path, err_path = os.path.join(d, ".stdout"), os.path.join(d, ".stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "_run.py"], cwd=d, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True)
            try:
                code: int | None = proc.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _kill_group(proc)
        return Outcome(code, _tail(out_path), _tail(err_path))


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the program's whole process group (whatever it started lives there too)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: str, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""

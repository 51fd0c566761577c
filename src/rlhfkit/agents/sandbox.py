"""Running a model's Python code in a separate, limited process (the built-in `python` tool).

The code runs in a new interpreter (`python -I`, this environment's packages importable) in its own process
group, with a fresh scratch directory as its working directory, HOME and TMPDIR (removed afterwards), only a
few environment variables (none of the trainer's), and these limits:

- CPU time: RLIMIT_CPU (the kernel stops it with SIGXCPU);
- memory: RLIMIT_AS, its address space (an allocation past it raises MemoryError);
- files it writes: RLIMIT_FSIZE, each file's size;
- output: the first `output_bytes` of stdout and of stderr are kept; a program that prints more is stopped;
- wall clock: stopped after `wall_seconds` (a sleeping or blocked program uses no CPU time).
- network: where the process may create a network namespace (root, or unprivileged user namespaces), it
  runs in a new empty one: no interface is up, not even loopback. Elsewhere the `socket` module's socket
  class is replaced by one that refuses to be created, which stops ordinary Python code and nothing else.

When it ends or is stopped, its whole process group is killed. This is not a security boundary for hostile
code: docs/agents.md lists what it does not protect against.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_mb: int = 512
    file_mb: int = 16
    output_bytes: int = 8192


@dataclass(frozen=True)
class PythonRun:
    """stdout, stderr: decoded, each cut to the output limit; returncode: the process's (negative: killed by
    that signal); stopped: why rlhfkit or the kernel stopped it ("wall_time", "cpu_time", "output") or None;
    network: how it was kept off the network, "namespace" or "socket_blocked" ("unknown": it died before)."""

    stdout: str
    stderr: str
    returncode: int
    stopped: str | None
    network: str


# Runs in the child before the code: network first (ctypes needs memory), then the limits, then the code.
# The last statement, when it is an expression, has its value printed, as in a notebook cell.
_BOOTSTRAP = r"""
import ast, ctypes, json, os, resource, signal, sys, traceback
limits, status_fd = json.loads(sys.argv[1]), int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
if libc.unshare(CLONE_NEWNET) == 0 or libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
    network = "namespace"
else:
    import socket
    class _NoNetwork(socket.socket):
        def __init__(self, *args, **kwargs):
            raise OSError("network access is disabled in this sandbox")
    socket.socket = _NoNetwork
    network = "socket_blocked"
os.write(status_fd, network.encode())
os.close(status_fd)
cpu, mem, fsize = limits["cpu_seconds"], limits["memory_mb"] << 20, limits["file_mb"] << 20
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the file limit fails with an error instead
g = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    with open("main.py", encoding="utf-8") as f:
        tree = compile(f.read(), "main.py", "exec", ast.PyCF_ONLY_AST)  # not ast.parse: no frame of ast.py
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "main.py", "exec"), g)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), "main.py", "eval"), g)
        if value is not None:
            print(repr(value))
except BaseException as e:
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    sys.exit(1)
"""


def run_python(code: str, limits: Limits = Limits()) -> PythonRun:
    """Run `code` as main.py in a fresh scratch directory under `limits`; return what it printed and why it
    stopped. Never raises for anything the code does."""
    scratch = tempfile.mkdtemp(prefix="rlhfkit-python-")
    try:
        with open(os.path.join(scratch, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        status_read, status_write = os.pipe()
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": scratch, "TMPDIR": scratch,
               "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1",
               # numerical libraries start one thread per core otherwise, each reserving address space
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(asdict(limits)), str(status_write)],
                cwd=scratch, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(status_write,), start_new_session=True)
        finally:
            os.close(status_write)
        try:
            stdout, stderr, stopped = _collect(proc, limits)
        finally:
            _kill_group(proc.pid)
            proc.wait()
            with os.fdopen(status_read, "rb") as f:
                network = f.read().decode() or "unknown"
        if stopped is None and proc.returncode == -signal.SIGXCPU:
            stopped = "cpu_time"
        cut = limits.output_bytes
        return PythonRun(stdout[:cut].decode("utf-8", "replace"), stderr[:cut].decode("utf-8", "replace"),
                         proc.returncode, stopped, network)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _collect(proc: subprocess.Popen, limits: Limits) -> tuple[bytes, bytes, str | None]:
    """Read stdout and stderr until the process has ended and nothing is left to read, it prints past the
    output limit, or the wall-clock limit passes (the caller kills it then)."""
    deadline = time.monotonic() + limits.wall_seconds
    out, err = bytearray(), bytearray()
    buffers = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    with selectors.DefaultSelector() as selector:
        for stream in (proc.stdout, proc.stderr):
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(out), bytes(err), "wall_time"
            events = selector.select(min(remaining, 0.05))
            for key, _ in events:
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffers[key.fd] += chunk
                if len(buffers[key.fd]) > limits.output_bytes:
                    return bytes(out), bytes(err), "output"
            if not events and proc.poll() is not None:
                break  # it ended; a process it started may hold the pipes open (the caller kills it)
    try:  # the pipes closed; the process may live on (it closed them itself)
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return bytes(out), bytes(err), "wall_time"
    return bytes(out), bytes(err), None


def _kill_group(pid: int) -> None:
    """SIGKILL the code's process group (it, and whatever it started that did not leave the group)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass

"""The python tool's separate process: its output, each limit, no network, the scratch directory."""

import glob
import os
import tempfile
import time

import pytest

from rlhfkit.agents.builtin_tools import python
from rlhfkit.agents.sandbox import Limits, run_python

FAST = Limits(wall_seconds=3, cpu_seconds=1, memory_mb=256, file_mb=1, output_bytes=1000)


def test_prints_stdout_stderr_and_a_final_expression():
    run = run_python("import sys\nprint('out')\nprint('err', file=sys.stderr)\n6 * 7", FAST)
    assert (run.stdout, run.stderr, run.returncode, run.stopped) == ("out\n42\n", "err\n", 0, None)


def test_an_error_shows_its_traceback_in_the_users_code():
    run = run_python("x = 1\n1 / x_missing", FAST)
    assert run.returncode == 1 and run.stopped is None
    assert 'File "main.py", line 2' in run.stderr and "NameError: name 'x_missing'" in run.stderr
    assert "<string>" not in run.stderr  # no frame of the bootstrap
    syntax = run_python("def f(:", FAST)
    assert 'File "main.py", line 1' in syntax.stderr and "SyntaxError" in syntax.stderr


def test_wall_clock_limit():
    start = time.monotonic()
    run = run_python("import time\nprint('start', flush=True)\ntime.sleep(60)", Limits(wall_seconds=1))
    assert run.stopped == "wall_time" and run.stdout == "start\n"
    assert time.monotonic() - start < 5


def test_cpu_time_limit():
    # a wall limit far above the CPU limit: on a busy machine 1 s of CPU time takes longer than 1 s
    run = run_python("while True:\n    pass", Limits(wall_seconds=60, cpu_seconds=1))
    assert run.stopped == "cpu_time"


def test_memory_limit():
    run = run_python("x = bytearray(1 << 30)", FAST)
    assert "MemoryError" in run.stderr and run.returncode == 1


def test_output_limit_stops_the_program():
    start = time.monotonic()
    run = run_python("while True:\n    print('y' * 100)", FAST)
    assert run.stopped == "output" and len(run.stdout) == FAST.output_bytes
    assert time.monotonic() - start < FAST.wall_seconds


def test_file_size_limit():
    run = run_python("open('big', 'wb').write(b'0' * (2 << 20))", FAST)
    assert "File too large" in run.stderr


def test_no_network():
    code = ("import socket\n"
            "try:\n"
            "    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
            "except OSError as e:\n"
            "    print('refused:', e)\n")
    run = run_python(code, FAST)
    assert run.network in ("namespace", "socket_blocked")
    assert run.stdout.startswith("refused:")
    if run.network == "namespace":  # not even loopback is up in the new namespace
        assert "unreachable" in run.stdout


def test_scratch_directory_environment_and_cleanup(monkeypatch):
    monkeypatch.setenv("RLHFKIT_SECRET_TOKEN", "hunter2")
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "rlhfkit-python-*")))
    run = run_python("import os\nopen('note.txt', 'w').write('x')\nprint(os.getcwd())\n"
                     "print(os.environ.get('RLHFKIT_SECRET_TOKEN'))\nprint(os.environ['HOME'] == os.getcwd())", FAST)
    cwd, secret, home_is_cwd = run.stdout.split()
    assert os.path.basename(cwd).startswith("rlhfkit-python-") and secret == "None" and home_is_cwd == "True"
    assert not os.path.exists(cwd)  # removed afterwards
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "rlhfkit-python-*"))) == before


def test_background_children_are_killed():
    code = ("import subprocess, sys\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(p.pid)")
    start = time.monotonic()
    run = run_python(code, FAST)
    assert time.monotonic() - start < FAST.wall_seconds  # its open pipes did not hold the call to the limit
    time.sleep(0.2)
    try:
        state = open(f"/proc/{int(run.stdout)}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z")  # a zombie where nobody reaps orphans (a container whose PID 1 is no init)


def test_python_tool_text():
    assert python("print('a')\n1 + 1") == "a\n2"
    assert python("pass") == "(no output)"
    assert python("raise ValueError('no')").endswith("ValueError: no")

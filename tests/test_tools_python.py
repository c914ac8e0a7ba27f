"""ossgpt.tools.python: the python tool's notebook sessions, and its sandbox against a table of
escape attempts, each in real child processes (no mocks). Each attempt gets a contained, readable
reply, and the same PythonTool serves the next call afterwards."""

from __future__ import annotations

import os
import socket
import string
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ossgpt.tools import sandbox
from ossgpt.tools.python import NO_OUTPUT, PythonLimits, PythonTool

ROOT = Path(__file__).resolve().parent.parent
REASON = sandbox.unavailable_reason()
needs_sandbox = pytest.mark.skipif(REASON is not None, reason=f"this platform cannot sandbox: {REASON}")
LIMITS = PythonLimits(cpu_seconds=20, memory_bytes=512 << 20, processes=32, file_bytes=1 << 20,
                      wall_seconds=3.0, output_chars=2000)
SECRET = f"secret-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def tool(tmp_path_factory: pytest.TempPathFactory):
    with PythonTool(LIMITS, scratch_root=tmp_path_factory.mktemp("python-tool")) as t:
        yield t


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory):
    """Things outside the sandbox to reach for: a listening socket, files holding SECRET in the
    real home folder and in a temporary folder, folders to write into, this process's pid."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.3)
    outside = tmp_path_factory.mktemp("outside")
    home_secret = Path.home() / f".ossgpt-test-secret-{uuid.uuid4().hex}"
    home_secret.write_text(SECRET)
    (outside / "secret.txt").write_text(SECRET)
    yield {"port": listener.getsockname()[1], "listener": listener, "home": str(Path.home()),
           "home_secret": str(home_secret), "outside_secret": str(outside / "secret.txt"),
           "outside": str(outside), "pid": os.getpid(), "tag": uuid.uuid4().hex}
    home_secret.unlink()
    listener.close()


def _no_connection(t: dict) -> None:
    with pytest.raises(socket.timeout):
        t["listener"].accept()


def _nothing_written(t: dict) -> None:
    assert not (Path(t["home"]) / f"escaped-{t['tag']}").exists()
    assert not (Path(t["outside"]) / f"escaped-{t['tag']}").exists()


# name, code ($names are filled from `targets`), texts one of which the reply holds, a check after
ESCAPES = [
    ("connect to loopback", "import socket\nsocket.create_connection(('127.0.0.1', $port), timeout=2)",
     ("Operation not permitted", "Network is unreachable", "Permission denied"), _no_connection),
    ("connect outside", "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)",
     ("Operation not permitted", "Network is unreachable", "Permission denied"), None),
    ("raw UDP packet", "import _socket\ns = _socket.socket(2, 2)\ns.sendto(b'x', ('1.1.1.1', 53))",
     ("Operation not permitted", "Network is unreachable"), None),
    ("read a file in $HOME", "print(open('$home_secret').read())", ("PermissionError",), None),
    ("list $HOME", "import os\nprint(os.listdir('$home'))", ("PermissionError",), None),
    ("read a file outside scratch", "print(open('$outside_secret').read())",
     ("PermissionError", "FileNotFoundError"), None),
    ("read /etc/shadow", "print(open('/etc/shadow').read())", ("PermissionError",), None),
    ("read /etc/passwd", "print(open('/etc/passwd').read())", ("PermissionError",), None),
    ("write to $HOME", "open('$home/escaped-$tag', 'w').write('x')", ("PermissionError",),
     _nothing_written),
    ("write outside scratch", "open('$outside/escaped-$tag', 'w').write('x')",
     ("PermissionError", "FileNotFoundError"), _nothing_written),
    # the bomb's children die as their forks fail, making room for the parent's next fork: on a
    # busy machine it can spin until the wall clock ends it, contained either way
    ("fork bomb", "import os\nwhile True:\n    os.fork()",
     ("BlockingIOError", "timed out after 3 seconds"), None),
    ("memory bomb", "chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))",
     ("MemoryError", "The Python process ended"), None),
    ("one huge allocation", "x = bytearray(8 << 30)", ("MemoryError",), None),
    ("infinite loop", "while True:\n    pass", ("timed out after 3 seconds",), None),
    ("sleeping forever", "import time\ntime.sleep(3600)", ("timed out after 3 seconds",), None),
    ("huge output", "print('x' * 10_000_000)", ("output truncated",), None),
    ("huge file", "open('/mnt/data/big', 'wb').write(b'0' * (8 << 20))", ("File too large",), None),
    ("subprocess", "import subprocess\nsubprocess.run(['cat', '/etc/shadow'])",
     ("PermissionError",), None),
    ("os.system", "import os\nstatus = os.system('cat /etc/shadow')\nprint('exit status', status)",
     ("exit status 32512",), None),          # /bin/sh may not be executed: 127 << 8
    ("socket through x32 numbers", "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
     "print('socket', libc.syscall(0x40000000 + 41, 2, 1, 0), os.strerror(ctypes.get_errno()))"
     if os.uname().machine == "x86_64" else "print('socket -1 Operation not permitted')",
     ("socket -1 Operation not permitted",), None),
    ("signal the parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('sent')",
     ("PermissionError",), None),
    ("kill the test process", "import os, signal\nos.kill($pid, signal.SIGKILL)\nprint('sent')",
     ("ProcessLookupError", "PermissionError"), None),
    ("kill every process", "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('sent')",
     ("sent", "PermissionError", "ProcessLookupError"), None),
    ("environment secrets", "import os\nprint(os.environ.get('OPENAI_API_KEY'), 'HOME=' + os.environ['HOME'])",
     ("None HOME=/mnt/data",), None),
    ("unmount /mnt/data", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
     "print('umount', libc.umount2(b'/mnt/data', 2), ctypes.get_errno())\nimport os\n"
     "print(os.listdir('/mnt/data'))", ("umount -1 1",), None),
]


@needs_sandbox
@pytest.mark.parametrize("name,code,expect,after", ESCAPES, ids=[e[0] for e in ESCAPES])
def test_escape_is_contained(tool: PythonTool, targets: dict, monkeypatch: pytest.MonkeyPatch,
                             name: str, code: str, expect: tuple, after) -> None:
    if name == "fork bomb" and sandbox.process_limit() is None:
        pytest.skip("run as root without a writable pids cgroup: Linux ignores RLIMIT_NPROC for "
                    "uid 0, so nothing would cap a fork bomb")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    session = f"escape-{name}"
    reply = tool.run(session, string.Template(code).substitute(targets))
    assert any(text in reply for text in expect), f"{name}: {reply[-1500:]}"
    assert SECRET not in reply
    assert len(reply) < LIMITS.output_chars + 500
    if after is not None:
        after(targets)
    # the same tool, and even the same session, still answers (after what the attempt's own
    # processes may still print)
    assert "42" in tool.run(session, "print(6 * 7)")
    tool.close(session)


@needs_sandbox
def test_still_serves_after_the_escapes(tool: PythonTool) -> None:
    assert tool.run("after", "import sys\nsys.version_info[0]") == "3\n"


@needs_sandbox
def test_state_persists_within_a_session(tool: PythonTool) -> None:
    assert tool.run("state", "x = 2") == NO_OUTPUT
    assert tool.run("state", "print(x * 21)") == "42\n"
    assert tool.run("state", "import math\nmath.sqrt(x * 8)") == "4.0\n"    # a final expression
    assert "NameError" in tool.run("state", "undefined_name")
    assert tool.run("state", "x") == "2\n"                                  # an error kept state
    tool.close("state")


@needs_sandbox
def test_sessions_are_apart(tool: PythonTool) -> None:
    tool.run("a", "secret = 'only a'\nopen('/mnt/data/a.txt', 'w').write('mine')")
    assert "NameError" in tool.run("b", "secret")
    assert tool.run("b", "import os\nos.listdir('/mnt/data')") == "[]\n"
    a_data = str(tool._sessions["a"].data)          # a's folder by its real path, from b
    assert "Error" in tool.run("b", f"open({a_data + '/a.txt'!r}).read()")
    assert tool.run("a", "secret") == "'only a'\n"
    tool.close("a")
    tool.close("b")


@needs_sandbox
def test_files_persist_in_mnt_data_even_past_a_timeout(tool: PythonTool) -> None:
    tool.run("files", "with open('/mnt/data/notes.txt', 'w') as f:\n    f.write('kept')\ny = 1")
    assert tool.run("files", "import os\nos.getcwd(), open('notes.txt').read()") \
        == "('/mnt/data', 'kept')\n"
    assert "state (variables, imports) was reset" in tool.run("files", "while True:\n    pass")
    assert "NameError" in tool.run("files", "y")
    assert tool.run("files", "open('/mnt/data/notes.txt').read()") == "'kept'\n"
    folder = tool._sessions["files"].folder
    tool.close("files")
    assert not folder.exists()


@needs_sandbox
def test_tracebacks_and_exits_read_well(tool: PythonTool) -> None:
    reply = tool.run("tb", "def f():\n    return 1 / 0\nf()")
    assert reply.startswith("Traceback") and 'File "<cell 1>", line 2, in f' in reply
    assert "_child" not in reply                   # the REPL's own frames are not shown
    assert "SystemExit: 3" in tool.run("tb", "raise SystemExit(3)")
    forked = ("import os, sys\npid = os.fork()\nif pid == 0:\n    print('child')\n    sys.exit(7)\n"
              "os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])")
    assert tool.run("tb", forked) == "child\n7\n"     # a forked child's exit ends it, not the REPL
    reply = tool.run("tb", "import os\nos._exit(5)")
    assert "ended (it exited with status 5)" in reply and "reset" in reply
    assert tool.run("tb", "1 + 1") == "2\n"
    tool.close("tb")


def test_bad_input_is_one_clear_error(tool: PythonTool) -> None:
    with pytest.raises(ValueError, match="non-empty session id"):
        tool.run("", "print(1)")
    with pytest.raises(ValueError, match="code of type bytes"):
        tool.run("s", b"print(1)")


# -- where no sandbox can be made ---------------------------------------------------------------

def test_run_refuses_where_the_platform_cannot_sandbox(tmp_path: Path) -> None:
    """Inside a user namespace that may not make more (max_user_namespaces = 0): the tool refuses
    and runs nothing, unless told unsandboxed=True. Where this platform itself cannot sandbox,
    the same, without that namespace."""
    program = tmp_path / "program.py"
    program.write_text("from ossgpt.tools.python import PythonTool\n"
                       "for unsandboxed in (False, True):\n"
                       "    with PythonTool(unsandboxed=unsandboxed) as t:\n"
                       "        print(t.run('s', 'print(\"ran\" * 2)').strip())\n")
    command = [sys.executable, str(program)]
    if REASON is None:
        command = ["unshare", "-r", "sh", "-c",
                   'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if REASON is None and done.returncode != 0 and "max_user_namespaces" in done.stderr:
        pytest.skip(f"cannot make a user namespace that forbids nested ones: {done.stderr}")
    assert done.returncode == 0, done.stderr
    refused, unsandboxed = done.stdout.strip().split("\n")
    assert refused.startswith("The python tool is unavailable") and "not run" in refused
    assert "ranran" not in refused
    assert unsandboxed == "ranran"


@needs_sandbox
def test_close_kills_the_sessions_processes(tool: PythonTool) -> None:
    reply = tool.run("bg", "import subprocess, sys\n"
                           "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                           "print('started')")
    assert reply == "started\n"
    pid = tool._sessions["bg"].child.proc.pid
    tool.close("bg")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # no process of the sandbox is left: none of ours runs `time.sleep(600)`
    leftovers = subprocess.run(["pgrep", "-f", "time.sleep\\(600\\)"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", leftovers.stdout

"""Running model-written code (HumanEval) in a throwaway child process.

The child gets: no network (a new user + network namespace through `unshare -rn` where the
kernel allows it, so only a loopback that is down; and, in every case, Python's socket
constructors replaced by ones that raise, which is all that stands where namespaces are not
allowed: say so in the result's `network` field), CPU seconds and address space capped
(RLIMIT_CPU, RLIMIT_AS), files capped (RLIMIT_FSIZE), a wall-clock timeout that kills its whole
process group, a scratch directory as cwd and HOME that is deleted afterwards, an environment
without the parent's variables, and `python -I` (no user site, no PYTHON* variables).
This contains mistakes and casual escapes, not a determined attacker: run untrusted models'
code inside a VM or container too.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from .grading import NO_ANSWER, OK, Grade, extract_code
from .suites import Sample

# Prepended to the program: sockets fail even where no network namespace could be made.
_NO_SOCKETS = """\
import socket as _s
def _refuse(*a, **k):
    raise OSError("network access is disabled in the ossgpt sandbox")
_s.socket = _s.create_connection = _s.socketpair = _s.getaddrinfo = _refuse
del _s, _refuse
"""


@dataclass
class RunResult:
    passed: bool
    status: str            # passed | failed | timeout
    output: str            # the end of stderr/stdout
    network: str           # "namespace" or "sockets disabled"


@functools.lru_cache(maxsize=1)
def network_isolation() -> str:
    """'namespace' where `unshare -rn` works here, else 'sockets disabled'."""
    unshare = shutil.which("unshare")
    if unshare:
        try:
            done = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10)
            if done.returncode == 0:
                return "namespace"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "sockets disabled"


def _limits(cpu_s: int, memory_bytes: int) -> None:
    """In the child before exec: its own process group, and the resource limits."""
    os.setsid()
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(program: str, timeout_s: float = 10.0, cpu_s: int = 10,
               memory_bytes: int = 1 << 30) -> RunResult:
    """Run `program` with python in the sandbox; passed = exit status 0 within the limits."""
    isolation = network_isolation()
    scratch = tempfile.mkdtemp(prefix="ossgpt-sandbox-")
    try:
        path = os.path.join(scratch, "program.py")
        with open(path, "w") as f:
            f.write(_NO_SOCKETS + program)
        command = [sys.executable, "-I", path]
        if isolation == "namespace":
            command = [shutil.which("unshare"), "-rn"] + command
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(command, cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=functools.partial(_limits, cpu_s, memory_bytes))
        try:
            out, _ = proc.communicate(timeout=timeout_s)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, _ = proc.communicate()
            status = "timeout"
        text = out.decode("utf-8", errors="replace")[-2000:]
        return RunResult(status == "passed", status, text, isolation)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def humaneval_program(sample: Sample, content: str) -> str:
    """human-eval's check program: the prompt's function completed by the answer, the test,
    then check(entry_point). An answer holding the whole function (as asked) replaces the
    prompt's stub but keeps its imports and helpers; an answer that is a bare body completes
    the prompt, as human-eval's completions do."""
    meta = sample.meta
    code = extract_code(content)
    if f"def {meta['entry_point']}" in code:
        body = meta["prompt"] + "\n    pass\n\n" + code
    else:
        body = meta["prompt"] + code
    return f"{body}\n\n{meta['test']}\n\ncheck({meta['entry_point']})\n"


def grade_humaneval(sample: Sample, content: str | None, timeout_s: float = 10.0) -> Grade:
    if content is None or not content.strip():
        return Grade(None, 0.0, NO_ANSWER)
    result = run_python(humaneval_program(sample, content), timeout_s=timeout_s)
    return Grade(extract_code(content), float(result.passed), OK,
                 {"run": result.status, "network": result.network,
                  "output": result.output[-500:]})

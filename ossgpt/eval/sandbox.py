"""Running model-written code (HumanEval) in a throwaway child process.

The child is confined by ossgpt/tools/sandbox.py, as the python tool's are (user, mount, network
and PID namespaces, Landlock: only its scratch folder and the Python installation are reachable,
seccomp, CPU/memory/process/file-size limits, an environment without the parent's variables),
plus a wall-clock timeout that kills it all. Where that sandbox cannot be set up here, the program
still runs, as graded benchmark code always has, with the limits and Python's socket constructors
replaced by ones that raise: the result's `network` field says which ("namespace" or "sockets
disabled"). This contains mistakes and casual escapes, not a determined attacker: run untrusted
models' code inside a VM or container too.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..tools.sandbox import Child, Limits, unavailable_reason
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


def network_isolation() -> str:
    """'namespace' where the sandbox (its network namespace among the rest) works here, else
    'sockets disabled'."""
    return "namespace" if unavailable_reason() is None else "sockets disabled"


def run_python(program: str, timeout_s: float = 10.0, cpu_s: int = 10,
               memory_bytes: int = 1 << 30) -> RunResult:
    """Run `program` with python in the sandbox; passed = exit status 0 within the limits."""
    isolation = network_isolation()
    scratch = Path(tempfile.mkdtemp(prefix="ossgpt-sandbox-"))
    try:
        (scratch / "program.py").write_text(_NO_SOCKETS + program)
        limits = Limits(cpu_seconds=cpu_s, memory_bytes=memory_bytes, file_bytes=16 << 20)
        # mounts=False: the program sees its scratch folder by its own path, as cwd and HOME
        child = Child("file", scratch, scratch, limits, confine=isolation == "namespace",
                      mounts=False, program="program.py")
        try:
            out, event = child.read(time.monotonic() + timeout_s, 4000, until=None)
            status = child.exit_status() if event == "exited" else None
        finally:
            child.kill()
        run = "timeout" if event == "timeout" else "passed" if status == 0 else "failed"
        return RunResult(run == "passed", run, out[-2000:], isolation)
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

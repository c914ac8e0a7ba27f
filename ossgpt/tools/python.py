"""The execution side of gpt-oss's built-in `python` tool: a stateful, notebook-like Python per
conversation, sandboxed (ossgpt/tools/sandbox.py) without Docker and without root.

The model is told: code runs "in a stateful Jupyter notebook environment", replies come back or
"time out after 120.0 seconds", "the drive at '/mnt/data' can be used to save and persist user
files" and "internet access for this session is disabled". So each session (a conversation id)
gets a long-lived interpreter whose globals persist between calls, a scratch folder bound at
/mnt/data (its only writable place, with a private /tmp), no network, and a wall-clock limit per
call after which the interpreter is killed and restarted empty (files are kept).

    tool = PythonTool()
    tool.run("conv-1", "x = 2")
    tool.run("conv-1", "x * 21")        # '42\\n', a final expression's value is shown
    tool.close()
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .sandbox import Child, Limits, describe_exit, unavailable_reason

NO_OUTPUT = "[no output: use print() to see values, or end the code with an expression]"
STARTUP_SECONDS = 30.0      # a cold start imports site-packages' .pth hooks; normally ~0.1 s


@dataclass
class PythonLimits(Limits):
    """cpu_seconds (300), memory_bytes (1 GiB), processes (64) and file_bytes (64 MiB) are the
    kernel's limits on each process in the sandbox (see Limits); wall_seconds (120) ends one call,
    as the model is told; output_chars (16,000) is the most of a reply's output kept (its start
    and end, the middle cut)."""
    wall_seconds: float = 120.0
    output_chars: int = 16_000


class _Session:
    def __init__(self, folder: Path):
        self.folder = folder
        self.data = folder / "data"         # /mnt/data inside
        self.tmp = folder / "tmp"           # /tmp inside
        self.data.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        self.child: Child | None = None
        self.lock = threading.Lock()

    def stop(self) -> None:
        if self.child is not None:
            self.child.kill()
            self.child = None


class PythonTool:
    """Runs the model's python messages, one sandboxed interpreter per session.

    Args:
        limits: resource limits (PythonLimits' defaults when None).
        unsandboxed: run the code without the sandbox where it cannot be set up (the CLI's
            --python-unsandboxed); limits, wall time and a clean environment still apply, but
            the code can read and write what the server can, and reach the network.
        scratch_root: where the sessions' folders go (a new temporary folder when None, deleted
            by close()).
    """

    def __init__(self, limits: PythonLimits | None = None, unsandboxed: bool = False,
                 scratch_root: str | Path | None = None):
        self.limits = limits or PythonLimits()
        self.unsandboxed = unsandboxed
        self._own_root = scratch_root is None
        self.root = Path(scratch_root) if scratch_root is not None \
            else Path(tempfile.mkdtemp(prefix="ossgpt-python-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def run(self, session: str, code: str) -> str:
        """Execute `code` in the session's interpreter; returns what the model sees: the output
        (stdout and stderr together, a final expression's repr, a traceback), or why nothing ran."""
        if not isinstance(session, str) or not session or not isinstance(code, str):
            raise ValueError(f"PythonTool.run needs a non-empty session id and code as strings, "
                             f"got session={session!r} and code of type {type(code).__name__}")
        if not self.unsandboxed and (reason := unavailable_reason()):
            return ("The python tool is unavailable: this server cannot sandbox code "
                    f"({reason}). The code was not run.")
        state = self._session(session)
        with state.lock:
            if state.child is None:
                refusal = self._start(state)
                if refusal:
                    return refusal
            child = state.child
            wall = self.limits.wall_seconds
            try:
                child.send(code)
            except (BrokenPipeError, OSError):
                pass            # it died while idle; read() below reports how
            output, event = child.read(time.monotonic() + wall, self.limits.output_chars,
                                       until="done")
            if event == "message":
                return output or NO_OUTPUT
            if event == "timeout":
                state.stop()
                note = (f"Execution timed out after {wall:g} seconds; the Python process was "
                        "restarted, so its state (variables, imports) was reset. Files in "
                        "/mnt/data were kept.")
            else:
                status = child.exit_status()
                state.stop()
                note = (f"The Python process ended ({describe_exit(status)}); its state "
                        "(variables, imports) was reset. Files in /mnt/data were kept.")
            return f"{output.rstrip()}\n\n[{note}]".lstrip()

    def close(self, session: str | None = None) -> None:
        """End one session (or all): kill its processes and delete its files."""
        with self._lock:
            names = [session] if session is not None else list(self._sessions)
            states = [self._sessions.pop(name) for name in names if name in self._sessions]
        for state in states:
            with state.lock:
                state.stop()
                shutil.rmtree(state.folder, ignore_errors=True)
        if session is None and self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PythonTool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _session(self, session: str) -> _Session:
        with self._lock:
            if session not in self._sessions:
                # a hash, not the id itself, names the folder: ids are arbitrary text
                name = hashlib.sha256(session.encode("utf-8")).hexdigest()[:24]
                self.root.mkdir(parents=True, exist_ok=True)
                self._sessions[session] = _Session(self.root / name)
            return self._sessions[session]

    def _start(self, state: _Session) -> str | None:
        """Start the session's interpreter; a refusal message when it could not be confined."""
        child = Child("repl", state.data, state.tmp, self.limits, confine=not self.unsandboxed)
        report, output = child.read_line(time.monotonic() + STARTUP_SECONDS)
        if report is None:
            status = child.exit_status(1.0)
            child.kill()
            why = output.strip() or describe_exit(status)
            return f"The python tool is unavailable: the sandbox could not start ({why}). " \
                   "The code was not run."
        state.child = child
        return None

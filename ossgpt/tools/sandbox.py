"""Starting Python children confined with what Linux gives an unprivileged user: user, mount,
network, PID, IPC and UTS namespaces, Landlock, seccomp and resource limits (the in-child side is
ossgpt/tools/_child.py). Used by the python tool (a long-lived REPL per session) and by the
HumanEval grader (one program, ossgpt/eval/sandbox.py).

No Docker, no root, no setuid helper. Where the kernel refuses a required part (user namespaces
or Landlock), `unavailable_reason()` says why and callers refuse rather than run unconfined.
This contains mistakes and casual escapes; it is not a boundary against a determined attacker
with a kernel exploit: run untrusted models' code inside a VM too.
"""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

_CHILD_SOURCE = (Path(__file__).with_name("_child.py")).read_text()
SETUP_FAILED = 125          # the child's exit status when it could not confine itself


@dataclass
class Limits:
    """Kernel-enforced limits on each sandboxed process (RLIMIT_*; the CPU time is each
    process's total over its life, so a python session's interpreter is restarted once it has
    used it up)."""
    cpu_seconds: int = 300
    memory_bytes: int = 1 << 30         # address space
    processes: int = 64                 # processes and threads in the sandbox
    file_bytes: int = 64 << 20          # largest file it may write


def read_paths() -> list[str]:
    """What a sandboxed Python may read and execute: its own installation (and a virtualenv's),
    the shared libraries it loads, and the time zone data. Nothing else of the file system."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))}
    paths = {os.path.realpath(p) for p in paths}
    paths |= {"/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/share/zoneinfo",
              "/etc/ld.so.cache", "/etc/localtime"}
    return sorted(p for p in paths if os.path.exists(p))


def _cgroup_for(processes: int) -> Path | None:
    """A pids cgroup capping the sandbox's process count, only where it is needed: Linux does not
    enforce RLIMIT_NPROC on processes of real uid 0, so a server run as root uses a pids cgroup
    it may create (cgroup v1's pids hierarchy, or a writable v2 cgroup). None otherwise."""
    if os.getuid() != 0:
        return None
    candidates = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            candidates.append(Path("/sys/fs/cgroup/pids") / path.lstrip("/"))
        elif controllers == "":
            candidates.append(Path("/sys/fs/cgroup") / path.lstrip("/"))
    for parent in candidates:
        group = parent / f"ossgpt-sandbox-{uuid.uuid4().hex[:12]}"
        try:
            group.mkdir()
        except OSError:
            continue
        try:
            (group / "pids.max").write_text(str(processes))
            return group
        except OSError:
            group.rmdir()
    return None


def process_limit() -> str | None:
    """How the sandbox's process count is capped here: "rlimit" (RLIMIT_NPROC, counted in the
    sandbox's own user namespace), "cgroup" (as root, a pids cgroup), or None (root without a
    writable pids cgroup: Linux ignores RLIMIT_NPROC for real uid 0, so nothing caps it)."""
    if os.getuid() != 0:
        return "rlimit"
    group = _cgroup_for(1)
    if group is None:
        return None
    _remove_cgroup(group)
    return "cgroup"


def _remove_cgroup(group: Path) -> None:
    deadline = time.monotonic() + 2
    while True:
        try:
            for pid in (group / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return          # left behind, empty soon; never worth failing a request over
            time.sleep(0.02)


class Child:
    """One started child: `output` reads its stdout and stderr, `control` its messages to us
    (a JSON line once confined, then "done" after each REPL cell)."""

    def __init__(self, mode: str, scratch: Path, tmp: Path, limits: Limits, confine: bool,
                 mounts: bool = True, program: str | None = None):
        """mode "repl" (cells sent with send()) or "file" (run `program`, a file name in
        scratch); mounts: bind scratch at /mnt/data and tmp at /tmp (else each by its path)."""
        self.cgroup = _cgroup_for(limits.processes) if confine else None
        control_r, control_w = os.pipe()
        output_r, output_w = os.pipe()
        config = {"mode": mode, "confine": confine, "mounts": mounts, "scratch": str(scratch),
                  "tmp": str(tmp), "limits": asdict(limits), "control_fd": control_w,
                  "cgroup": str(self.cgroup) if self.cgroup else None,
                  "read_paths": read_paths(), "program": program}
        source = f"{_CHILD_SOURCE}\nmain(json.loads({json.dumps(config)!r}))\n"
        # Only these variables: nothing of the server's environment (API keys) goes in.
        # One thread for numeric libraries: OpenBLAS and OpenMP start one per core, which runs
        # into the process limit (threads count) and the address-space limit on big machines.
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(scratch),
               "TMPDIR": str(tmp), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-u", "-c", source], cwd=scratch, env=env,
                stdin=subprocess.PIPE if mode == "repl" else subprocess.DEVNULL,
                stdout=output_w, stderr=output_w, pass_fds=(control_w,), start_new_session=True)
        finally:
            os.close(control_w)
            os.close(output_w)
        self.control, self.output = control_r, output_r
        self._lines = b""
        self.last_line = ""

    def read(self, deadline: float, limit_chars: int, until: str | None) -> tuple[str, str]:
        """Read output until the child sends the control line `until` ("done"), or exits (both
        pipes closed), or the monotonic deadline passes: (output, "message" | "exited" |
        "timeout"). Output beyond limit_chars keeps its start and end, the middle cut out."""
        out = _Output(limit_chars)
        open_fds = [self.output, self.control]
        event = "exited"
        while open_fds:
            if until is not None and self._pop_line(until):
                event = "message"
                break
            left = deadline - time.monotonic()
            if left <= 0:
                event = "timeout"
                break
            ready, _, _ = select.select(open_fds, [], [], left)
            for fd in ready:
                data = os.read(fd, 1 << 16)
                if not data:
                    open_fds.remove(fd)
                elif fd == self.output:
                    out.add(data)
                else:
                    self._lines += data
        if event == "message":
            # the child flushed before saying "done": what it printed is already in the pipe
            os.set_blocking(self.output, False)
            try:
                while data := os.read(self.output, 1 << 16):
                    out.add(data)
            except BlockingIOError:
                pass
            os.set_blocking(self.output, True)
        return out.text(), event

    def read_line(self, deadline: float) -> tuple[str | None, str]:
        """The next control line (the child's report once confined), and the output so far."""
        output, event = self.read(deadline, 4000, until="")
        return (self.last_line if event == "message" else None), output

    def _pop_line(self, until: str) -> bool:
        if b"\n" not in self._lines:
            return False
        line, self._lines = self._lines.split(b"\n", 1)
        self.last_line = line.decode("utf-8", errors="replace")
        return until == "" or self.last_line == until

    def send(self, code: str) -> None:
        data = code.encode("utf-8")
        self.proc.stdin.write(len(data).to_bytes(8, "little") + data)
        self.proc.stdin.flush()

    def exit_status(self, timeout: float = 5.0) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """The whole sandbox: its process group, and through P0 (PDEATHSIG of the PID namespace's
        pid 1) everything in the namespace, even processes that left the group."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.kill()
        self.proc.wait()
        if self.cgroup:
            _remove_cgroup(self.cgroup)
        for f in (self.proc.stdin,):
            if f:
                try:
                    f.close()
                except OSError:
                    pass
        for fd in (self.control, self.output):
            try:
                os.close(fd)
            except OSError:
                pass


class _Output:
    def __init__(self, limit_chars: int):
        self.limit = limit_chars
        self.head, self.tail, self.total = bytearray(), bytearray(), 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = 4 * self.limit - len(self.head)          # up to 4 bytes a character
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        self.tail = (self.tail + data)[-4 * self.limit:]

    def text(self) -> str:
        text = (self.head + self.tail).decode("utf-8", errors="replace")
        if len(text) <= self.limit and len(self.head) + len(self.tail) == self.total:
            return text
        half = self.limit // 2
        head = self.head.decode("utf-8", errors="replace")[:half]
        tail = (self.head + self.tail).decode("utf-8", errors="replace")[-half:]
        return (f"{head}\n[... output truncated: {self.total:,} bytes in all, the middle cut "
                f"to keep {self.limit:,} characters ...]\n{tail}")


def describe_exit(status: int | None) -> str:
    """Why a child ended, in words the model can act on."""
    if status is None:
        return "it did not exit"
    signals = {signal.SIGXCPU: "it used up its CPU time limit",
               signal.SIGKILL: "it was killed (out of memory or over a limit)",
               signal.SIGXFSZ: "it wrote a file over the size limit"}
    if status < 0 or status > 128:
        number = -status if status < 0 else status - 128
        try:
            sig = signal.Signals(number)
        except ValueError:
            return f"it exited with status {status}"
        return signals.get(sig, f"it was ended by {sig.name}")
    return f"it exited with status {status}"


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None where a confined child starts here; else why not (once per process)."""
    if sys.platform != "linux":
        return f"the sandbox needs Linux (user namespaces and Landlock); this is {sys.platform}"
    root = Path(tempfile.mkdtemp(prefix="ossgpt-sandbox-probe-"))
    try:
        (root / "probe.py").write_text("pass\n")
        child = Child("file", root, root, Limits(cpu_seconds=10), confine=True, mounts=True,
                      program="probe.py")
        output, event = child.read(time.monotonic() + 30, 2000, until=None)
        status = child.exit_status()
        child.kill()
        if event == "exited" and status == 0:
            return None
        return output.strip() or describe_exit(status)
    except OSError as e:
        return f"could not start the sandbox: {e}"
    finally:
        shutil.rmtree(root, ignore_errors=True)

"""Run `ossgpt serve` in a child process on a free loopback port: for tests, benchmarks and
notebooks that want a real server without managing one."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator


@contextlib.contextmanager
def served(*args: str, timeout: float = 120.0) -> Iterator[str]:
    """Start `python -m ossgpt serve ARGS` (nano unless --model is given); yield its base URL
    (http://127.0.0.1:PORT) once /health answers; stop it afterwards. Raises RuntimeError with
    the server's output if it exits or does not come up within `timeout` seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "ossgpt", "serve", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def output() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")

    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ossgpt serve exited with {proc.returncode}:\n{output()}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"ossgpt serve did not answer in {timeout:.0f} s:\n{output()}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

"""ossgpt.eval.sandbox: HumanEval programs run in a child without network, with CPU, memory
and time limits, in a scratch folder that is deleted."""

from __future__ import annotations

import glob
import tempfile
import time

from ossgpt.eval.sandbox import grade_humaneval, network_isolation, run_python
from ossgpt.eval.suites import Sample

PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def task() -> Sample:
    return Sample("HumanEval/x", [{"role": "user", "content": PROMPT}], None, "humaneval",
                  meta={"prompt": PROMPT, "test": TEST, "entry_point": "add"})


def test_right_and_wrong_solutions() -> None:
    right = grade_humaneval(task(), "Here:\n```python\ndef add(a, b):\n    return a + b\n```")
    assert right.score == 1 and right.detail["run"] == "passed"
    body_only = grade_humaneval(task(), "    return a + b\n")       # human-eval's completion form
    assert body_only.score == 1
    wrong = grade_humaneval(task(), "```python\ndef add(a, b):\n    return a - b\n```")
    assert wrong.score == 0 and wrong.detail["run"] == "failed"
    assert "AssertionError" in wrong.detail["output"]
    broken = grade_humaneval(task(), "```python\ndef add(a, b) return\n```")
    assert broken.score == 0 and "SyntaxError" in broken.detail["output"]
    assert grade_humaneval(task(), None).status == "no answer"


def test_infinite_loop_is_stopped() -> None:
    t0 = time.time()
    result = run_python("while True:\n    pass\n", timeout_s=2, cpu_s=1)
    assert not result.passed and result.status in ("timeout", "failed")
    assert time.time() - t0 < 10
    sleeper = run_python("import time\ntime.sleep(60)\n", timeout_s=1.5)
    assert sleeper.status == "timeout"


def test_memory_is_capped() -> None:
    result = run_python("x = bytearray(4 << 30)\n", memory_bytes=512 << 20)
    assert not result.passed and "MemoryError" in result.output


def test_network_is_refused() -> None:
    program = ("import socket\n"
               "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
               "s.settimeout(3)\n"
               "s.connect(('1.1.1.1', 80))\n")
    result = run_python(program)
    assert not result.passed
    assert result.network in ("namespace", "sockets disabled")
    assert "disabled in the ossgpt sandbox" in result.output
    # the namespace, where it exists, holds even without Python's socket module (raw syscall)
    if network_isolation() == "namespace":
        raw = run_python("import _socket\ns = _socket.socket(2, 1)\ns.settimeout(3)\n"
                         "s.connect(('1.1.1.1', 80))\n")
        assert not raw.passed and ("unreachable" in raw.output.lower()
                                   or "Errno" in raw.output)


def test_scratch_folder_is_cwd_and_deleted() -> None:
    before = set(glob.glob(tempfile.gettempdir() + "/ossgpt-sandbox-*"))
    result = run_python("import os\nopen('left.txt', 'w').write('x')\n"
                        "assert 'ossgpt-sandbox-' in os.getcwd()\n"
                        "assert os.environ['HOME'] == os.getcwd()\n")
    assert result.passed, result.output
    assert set(glob.glob(tempfile.gettempdir() + "/ossgpt-sandbox-*")) == before

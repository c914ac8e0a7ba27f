"""The documentation cannot rot: every code block of the guides runs against nano, in the order
a reader meets it, and every `ossgpt` command line on any page (run or not) parses with the real
command line; the site builds in strict mode (broken links, missing references fail).

A block's directives are HTML comments on the lines just above it (invisible on the site):
`<!-- not run: REASON -->` (real weights, a GPU, a download), `<!-- file: NAME -->` (write the
block to NAME instead of running it), `<!-- background: URL -->` (start it, wait until URL
answers, stop it when the page is done), `<!-- expect: TEXT -->` (its output must contain TEXT).
bash and python blocks run; others (output, data) are text unless a file directive writes them."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ossgpt import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)
DIRECTIVE = re.compile(r"<!--\s*(not run|file|background|expect):\s*(.*?)\s*-->")
RUNS = ("bash", "python")


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    text: str
    directives: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    out, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w*)\s*", lines[i])
        if not fence:
            i += 1
            continue
        directives, j = {}, i - 1
        while j >= 0 and (m := DIRECTIVE.fullmatch(lines[j].strip())):
            directives[m.group(1)] = m.group(2)
            j -= 1
        end = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
        out.append(Block(page, i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n", directives))
        i = end + 1
    return out


def runnable(page: Path) -> bool:
    return any(b.lang in RUNS and "not run" not in b.directives for b in blocks(page))


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def _command(block: Block, script: Path) -> list[str]:
    script.write_text(block.text)
    return ["bash", "-eo", "pipefail", str(script)] if block.lang == "bash" else [sys.executable, str(script)]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, block: Block) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{block}: the background command exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{block}: {url} did not answer within 300 s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)], ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    background: list[subprocess.Popen] = []
    try:
        for n, block in enumerate(blocks(page)):
            if "file" in block.directives:
                (tmp_path / block.directives["file"]).write_text(block.text)
                continue
            if block.lang not in RUNS or "not run" in block.directives:
                continue
            cmd = _command(block, tmp_path / f".block{n}.{'sh' if block.lang == 'bash' else 'py'}")
            if "background" in block.directives:
                log = tmp_path / f".block{n}.log"
                proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=log.open("w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
                background.append(proc)
                _wait_until_up(block.directives["background"], proc, log, block)
                continue
            done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
            output = done.stdout + done.stderr
            assert done.returncode == 0, f"{block} failed ({done.returncode}):\n{block.text}\n{output[-4000:]}"
            if "expect" in block.directives:
                assert block.directives["expect"] in done.stdout, f"{block}: no {block.directives['expect']!r} in\n{output[-4000:]}"
    finally:
        for proc in background:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_blocks_not_run_say_why() -> None:
    silent = [str(b) for p in PAGES for b in blocks(p) if "not run" in b.directives and not b.directives["not run"]]
    assert not silent, f"blocks marked 'not run' without a reason: {silent}"


# -- every command line on every page parses ---------------------------------------------------

def ossgpt_argvs(text: str) -> list[list[str]]:
    """The argument lists given to `ossgpt` (also through `python -m ossgpt` and `torchrun -m
    ossgpt`) in a shell script: continuation lines joined, comments dropped, pipelines and
    lists split."""
    tokens = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens += [*lexer, "\n"]
    argvs, words = [], []
    for token in tokens:
        if token in ("\n", "|", "||", "&&", ";", "&", "(", ")", "$("):
            while words and re.fullmatch(r"\w+=.*", words[0]):      # VAR=value before the command
                words.pop(0)
            if words[:1] == ["ossgpt"]:
                argvs.append(words[1:])
            elif "-m" in words and words[words.index("-m") + 1:][:1] == ["ossgpt"]:
                argvs.append(words[words.index("-m") + 2:])
            words = []
        else:
            words.append(token)
    return argvs


def test_command_lines_parse() -> None:
    problems, seen = [], 0
    for page in [*PAGES, ROOT / "README.md"]:
        for block in blocks(page):
            if block.lang != "bash":
                continue
            for argv in ossgpt_argvs(block.text):
                seen += 1
                try:
                    cli.build_parser().parse_args(cli._join_negative_lists(argv))
                except SystemExit:
                    problems.append(f"{block}: ossgpt {shlex.join(argv)}")
    assert seen > 30
    assert not problems, "command lines the CLI rejects:\n" + "\n".join(problems)


def test_command_line_reader_finds_what_a_shell_runs() -> None:
    script = ('OSSGPT_ISA=plain ossgpt generate --prompt "a | b" --max-tokens 8   # comment --nope\n'
              'echo hi | ossgpt chat --temperature 0 && torchrun --nproc-per-node 2 -m ossgpt finetune \\\n'
              '    --data x.jsonl\n')
    assert ossgpt_argvs(script) == [["generate", "--prompt", "a | b", "--max-tokens", "8"],
                                    ["chat", "--temperature", "0"], ["finetune", "--data", "x.jsonl"]]


def test_site_builds_strictly(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=dict(_env(), NO_MKDOCS_2_WARNING="1"), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for page in ("index.html", "reference/cli/index.html", "reference/http/index.html", "reference/python/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    cli_page = (tmp_path / "site" / "reference/cli/index.html").read_text()
    assert all(f"ossgpt {name}" in cli_page for name in cli.COMMANDS)

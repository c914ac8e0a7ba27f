"""The OpenAI Agents SDK for JavaScript (@openai/agents) against `ossgpt serve`.

tests/js/agent_weather.mjs runs a tool-calling agent (get_weather, plus nano's other demo tool
convert_units) through the SDK's Chat Completions model and its Responses model, each streamed
and not, and prints one JSON line per variant. Each must finish, run get_weather with city Paris,
produce a final answer, and do it with no non-2xx response and nothing logged by the SDK.

Needs node and npm (skipped without them); installs the pinned packages of tests/js with
`npm ci` (from package-lock.json) the first time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

JS_DIR = Path(__file__).parent / "js"
VARIANTS = ("chat_completions", "chat_completions_stream", "responses", "responses_stream")


def _npm_ci() -> None:
    if (JS_DIR / "node_modules" / "@openai" / "agents" / "package.json").exists():
        return
    out = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"npm ci in {JS_DIR} failed:\n{out.stdout}\n{out.stderr}"


@pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                    reason="node and npm are needed to run the OpenAI Agents SDK for JavaScript")
def test_agents_sdk_js_tool_calling(nano_server: str) -> None:
    _npm_ci()
    out = subprocess.run(["node", "agent_weather.mjs", nano_server], cwd=JS_DIR,
                         capture_output=True, text=True, timeout=900)
    print(out.stdout, end="")
    context = (f"\n--- exit status {out.returncode}\n--- stdout:\n{out.stdout}"
               f"\n--- stderr:\n{out.stderr}")
    results = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record["variant"]] = record
    assert sorted(results) == sorted(VARIANTS), f"missing variants{context}"
    for name in VARIANTS:
        r = results[name]
        assert r["ok"], f"{name} failed: {r['error']}{context}"
        assert any(c.get("tool") == "get_weather" and c.get("city") == "Paris"
                   for c in r["toolCalls"]), f"{name}: get_weather never ran with Paris{context}"
        assert isinstance(r["finalOutput"], str) and r["finalOutput"].strip(), \
            f"{name}: empty final output{context}"
    assert out.returncode == 0, f"agent_weather.mjs failed{context}"

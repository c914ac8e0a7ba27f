"""`ossgpt serve` under bad input and bad behaviour: every bad request gets its exact status and
the OpenAI error shape, the API key is enforced, clients that hang up mid-stream leave nothing
behind in the engine, and a full queue answers 503 while the admitted requests finish.

All against real servers on loopback ports (see conftest.run_server)."""

from __future__ import annotations

import json
import random
import re
import threading
import time

import openai
import pytest

try:  # openai >= 3 ships the client as httpx2
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from conftest import run_server

USER = [{"role": "user", "content": "What is 12 + 30?"}]
CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
ERROR_KEYS = {"message", "type", "param", "code"}

# A JSON answer of >= 400 integers: a reply under this schema cannot end before its token budget,
# so a request that kept generating after its client left would be noticed.
ENDLESS = {"type": "object", "required": ["s"],
           "properties": {"s": {"type": "array", "items": {"type": "integer"}, "minItems": 400}}}


def chat(**kw) -> dict:
    return {"model": "nano", "messages": USER, "max_tokens": 8, **kw}


def assert_error(r: httpx.Response, status: int, *, code=None, param=None,
                 mentions: str | None = None, type_: str = "invalid_request_error") -> dict:
    """The exact status and {"error": {"message", "type", "param", "code"}}."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == ERROR_KEYS, err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    assert err["type"] == type_, err
    assert err["code"] == code, err
    assert err["param"] == param, err
    if mentions is not None:
        assert mentions.lower() in err["message"].lower(), err
    return err


def _chunked(data: bytes, size: int = 1 << 16):
    for i in range(0, len(data), size):
        yield data[i:i + size]


_BIG = json.dumps(chat(messages=[{"role": "user", "content": "hello " * (900 << 10)}])).encode()
assert len(_BIG) > 4 << 20

#: id: (method, path, body: dict | bytes | generator factory | None, status, code, param, mentions)
BAD = {
    "malformed_json": ("POST", CHAT, b'{"model": "nano", "messages": [', 400, None, None, "JSON"),
    "empty_body": ("POST", CHAT, b"", 400, None, None, "JSON object"),
    "body_not_object": ("POST", CHAT, b'[1, 2]', 400, None, None, "JSON object"),
    "missing_messages": ("POST", CHAT, {"model": "nano"}, 400, None, "messages", "messages"),
    "messages_not_list": ("POST", CHAT, chat(messages="hi"), 400, None, "messages", "list"),
    "messages_empty": ("POST", CHAT, chat(messages=[]), 400, None, "messages", "messages"),
    "unknown_role": ("POST", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400,
                     None, "messages.0.role", "role"),
    "temperature_5": ("POST", CHAT, chat(temperature=5), 400, None, "temperature", "temperature"),
    "top_p_0": ("POST", CHAT, chat(top_p=0), 400, None, "top_p", "top_p"),
    "n_0": ("POST", CHAT, chat(n=0), 400, None, "n", "n:"),
    "n_100": ("POST", CHAT, chat(n=100), 400, None, "n", "n:"),
    "max_tokens_negative": ("POST", CHAT, chat(max_tokens=-1), 400, None, "max_tokens",
                            "max_tokens"),
    "stream_string": ("POST", CHAT, chat(stream="yes"), 400, None, "stream", "stream"),
    "stream_int": ("POST", COMPLETIONS, {"model": "nano", "prompt": "a", "stream": 1}, 400, None,
                   "stream", "stream"),
    "unknown_model": ("POST", CHAT, chat(model="gpt-9"), 404, "model_not_found", "model",
                      "gpt-9"),
    "unknown_model_get": ("GET", "/v1/models/gpt-9", None, 404, "model_not_found", "model",
                          "gpt-9"),
    "unknown_route": ("POST", "/v1/nope", {}, 404, "not_found", None, "/v1/nope"),
    "prompt_over_context": ("POST", CHAT, chat(messages=[{"role": "user",
                                                         "content": "hello " * 5000}]),
                            400, "context_length_exceeded", "messages", "context length"),
    "max_tokens_over_context": ("POST", CHAT, chat(max_tokens=4090), 400,
                                "context_length_exceeded", "max_tokens", "4090"),
    "max_output_tokens_over_context": ("POST", RESPONSES, {"model": "nano", "input": "hi",
                                                           "max_output_tokens": 5000},
                                       400, "context_length_exceeded", "max_output_tokens",
                                       "5000"),
    "completion_max_tokens_over_context": ("POST", COMPLETIONS, {"model": "nano", "prompt": "a",
                                                                 "max_tokens": 4096},
                                           400, "context_length_exceeded", "max_tokens", "4096"),
    "tool_choice_not_in_tools": ("POST", CHAT, chat(
        tools=[{"type": "function", "function": {"name": "get_weather"}}],
        tool_choice={"type": "function", "function": {"name": "get_time"}}),
        400, None, "tool_choice", "get_time"),
    "tool_choice_required_without_tools": ("POST", CHAT, chat(tool_choice="required"), 400, None,
                                           "tool_choice", "required"),
    "responses_tool_choice_required_without_tools": ("POST", RESPONSES, {
        "model": "nano", "input": "hi", "tool_choice": "required"}, 400, None, "tool_choice",
        "required"),
    "json_schema_without_schema": ("POST", CHAT, chat(response_format={
        "type": "json_schema", "json_schema": {"name": "answer"}}), 400, None, "response_format",
        "schema"),
    "tool_name_with_spaces": ("POST", CHAT, chat(tools=[{"type": "function", "function": {
        "name": "get the weather"}}]), 400, None, "tools.0.function.name", "name"),
    "stop_too_many": ("POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, None, "stop",
                      "stop"),
    "top_logprobs_without_logprobs": ("POST", CHAT, chat(top_logprobs=3), 400, None,
                                      "top_logprobs", "logprobs"),
    "responses_unknown_item_type": ("POST", RESPONSES, {"model": "nano", "input": [
        {"type": "bogus_item"}]}, 400, None, "input[0].type", "bogus_item"),
    "responses_unknown_previous_id": ("POST", RESPONSES, {
        "model": "nano", "input": "hi", "previous_response_id": "resp_does_not_exist"}, 404,
        "previous_response_not_found", "previous_response_id", "resp_does_not_exist"),
    "completions_empty_prompt": ("POST", COMPLETIONS, {"model": "nano", "prompt": ""}, 400, None,
                                 "prompt", "empty"),
    "completions_stream_n_2": ("POST", COMPLETIONS, {"model": "nano", "prompt": "a", "n": 2,
                                                     "stream": True}, 400, None, "n", "n=1"),
    # openai-harmony's tokenizer panics (a BaseException) on a 1 MB word: was a bare text 500.
    "untokenizable_message": ("POST", CHAT, chat(messages=[{"role": "user",
                                                           "content": "x" * (1 << 20)}]),
                              400, None, "messages", "tokenized"),
    "untokenizable_prompt": ("POST", COMPLETIONS, {"model": "nano", "prompt": "x" * (1 << 20)},
                             400, None, "prompt", "tokenized"),
    "body_over_4mb": ("POST", CHAT, _BIG, 413, "request_too_large", None, "bytes"),
    # No Content-Length: counted as it arrives (was read whole, then parsed and rendered).
    "body_over_4mb_chunked": ("POST", CHAT, lambda: _chunked(_BIG), 413, "request_too_large",
                              None, "bytes"),
    "get_on_post_route": ("GET", CHAT, None, 405, None, None, "GET"),
}


@pytest.fixture(scope="module")
def http(nano_server: str):
    with httpx.Client(base_url=nano_server, timeout=60) as c:
        yield c


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_request(http: httpx.Client, case: str) -> None:
    method, path, body, status, code, param, mentions = BAD[case]
    if isinstance(body, dict):
        content = json.dumps(body).encode()
    else:
        content = body() if callable(body) else body
    headers = {"content-type": "application/json"} if method == "POST" else {}
    r = http.request(method, path, content=content, headers=headers)
    assert_error(r, status, code=code, param=param, mentions=mentions)


def test_server_is_fine_after_bad_requests(http: httpx.Client) -> None:
    r = http.post(CHAT, json=chat(temperature=0, max_tokens=20))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert 1 <= body["usage"]["completion_tokens"] <= 20
    health = http.get("/health").json()
    assert health.pop("prefix_cache_bytes") > 0          # the prompts stay, for the next turns
    assert health == {"status": "ok", "active": 0, "waiting": 0, "prefilling": 0, "cache_bytes": 0}


def test_metrics_route_labels_are_bounded(http: httpx.Client) -> None:
    """Paths clients make up must not become Prometheus series (unbounded memory)."""
    for i in range(3):
        assert http.post(f"/v1/made-up-{i}", json={}).status_code == 404
    assert http.get("/v1/models/made-up-model").status_code == 404
    text = http.get("/metrics").text
    routes = set(re.findall(r'^ossgpt_requests_total\{route="([^"]*)"', text, re.M))
    assert not any("made-up" in r for r in routes), routes
    assert routes <= {CHAT, COMPLETIONS, RESPONSES, "/v1/models", "/v1/models/{name}", "other"}


# -- API key --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_server():
    with run_server("--api-key", "sekret", "--max-model-len", "1024") as url:
        yield url


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "sekret"},
                                     {"Authorization": "Basic sekret"}],
                         ids=["no_header", "wrong_key", "no_bearer", "basic"])
def test_api_key_required(keyed_server: str, headers: dict) -> None:
    for method, path, body in [("POST", CHAT, chat()), ("GET", "/v1/models", None),
                               ("GET", "/metrics", None), ("POST", CHAT, {"bad": "body"})]:
        r = httpx.request(method, keyed_server + path, json=body, headers=headers, timeout=30)
        assert_error(r, 401, code="invalid_api_key", mentions="API key")


def test_api_key_accepted_by_openai_client(keyed_server: str) -> None:
    client = openai.OpenAI(base_url=keyed_server + "/v1", api_key="sekret", max_retries=0)
    assert [m.id for m in client.models.list()] == ["nano"]
    out = client.chat.completions.create(model="nano", messages=USER, max_tokens=8,
                                         temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert 1 <= out.usage.completion_tokens <= 8
    bad = openai.OpenAI(base_url=keyed_server + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"


def test_health_needs_no_key(keyed_server: str) -> None:
    r = httpx.get(keyed_server + "/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_no_key_configured_ignores_bearer(nano_server: str) -> None:
    client = openai.OpenAI(base_url=nano_server + "/v1", api_key="sk-anything", max_retries=0)
    out = client.chat.completions.create(model="nano", messages=USER, max_tokens=4,
                                         temperature=0)
    assert 1 <= out.usage.completion_tokens <= 4


# -- clients hanging up mid-stream --------------------------------------------------------------

def _stream_request(kind: str, i: int, to_the_end: bool) -> tuple[str, dict]:
    """Readers to the end ask for a few tokens; clients that hang up ask for an endless JSON
    answer (chat, responses) or a long budget, so a request left running would be seen."""
    budget = 12 if to_the_end else 1500
    endless = not to_the_end
    if kind == "chat":
        body = {"model": "nano", "messages": [{"role": "user", "content": f"What is {i} + 7?"}],
                "stream": True, "max_tokens": budget, "temperature": 1, "seed": i,
                "stream_options": {"include_usage": True}}
        if endless:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "a", "schema": ENDLESS}}
        return CHAT, body
    if kind == "responses":
        body = {"model": "nano", "input": f"What is {i} * 3?", "stream": True,
                "max_output_tokens": budget, "temperature": 1, "seed": i}
        if endless:
            body["text"] = {"format": {"type": "json_schema", "name": "a", "schema": ENDLESS}}
        return RESPONSES, body
    return COMPLETIONS, {"model": "nano", "prompt": f"Once upon a time, {i}", "stream": True,
                         "max_tokens": budget, "temperature": 1.5, "seed": i}


def _generated(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return float(re.search(r"^ossgpt_generation_tokens_total (\S+)$", text, re.M).group(1))


def test_disconnects_leave_nothing_behind(nano_server: str) -> None:
    rng = random.Random(1234)
    total, batches = 50, 3
    plans = []
    for i in range(total):
        kind = ("chat", "responses", "completions")[i % 3]
        chunks = rng.choice([0, 1, 2, 3, 4, 5, None, None, None])   # None: to the end
        plans.append((kind, i, chunks))
    results: list[tuple] = []
    errors: list[str] = []
    peak = {"active": 0, "waiting": 0, "cache_bytes": 0}
    polling = True

    def poll() -> None:
        with httpx.Client(base_url=nano_server, timeout=30) as c:
            while polling:
                s = c.get("/health").json()
                for k in peak:
                    peak[k] = max(peak[k], s[k])
                time.sleep(0.05)

    def one(kind: str, i: int, chunks: int | None, barrier: threading.Barrier) -> None:
        path, body = _stream_request(kind, i, chunks is None)
        events, last = 0, None
        try:
            barrier.wait()
            with httpx.Client(base_url=nano_server, timeout=60) as c:
                with c.stream("POST", path, json=body) as r:
                    if r.status_code != 200:
                        errors.append(f"{kind} {i}: {r.status_code} {r.read()[:200]!r}")
                        return
                    if chunks != 0:
                        for line in r.iter_lines():
                            if line.startswith("data: "):
                                events, last = events + 1, line[6:]
                                if chunks is not None and events >= chunks:
                                    break
                # leaving the block closes the connection, mid-stream unless read to the end
            results.append((kind, chunks, events, last))
        except Exception as e:  # collected: an assert in a thread would go unnoticed
            errors.append(f"{kind} {i}: {type(e).__name__}: {e}")

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    start = time.perf_counter()
    try:
        size = -(-total // batches)
        for b in range(0, total, size):
            batch = plans[b:b + size]
            barrier = threading.Barrier(len(batch))
            threads = [threading.Thread(target=one, args=(*p, barrier)) for p in batch]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
                assert not t.is_alive(), "a client thread hung"
        closed = time.perf_counter()
        tokens_at_close = _generated(nano_server)
        while True:
            s = httpx.get(nano_server + "/health", timeout=30).json()
            if s["active"] == 0 and s["waiting"] == 0 and s["cache_bytes"] == 0:
                break
            assert time.perf_counter() - closed < 60, f"engine did not drain: {s}"
            time.sleep(0.05)
        drained = time.perf_counter()
    finally:
        polling = False
        poller.join(10)
    after_close = _generated(nano_server) - tokens_at_close
    assert not errors, errors
    assert len(results) == total
    hung_up = sum(1 for _, chunks, _, _ in results if chunks is not None)
    print(f"\n[disconnects] {total} streams ({hung_up} hung up after 0-5 events, "
          f"{total - hung_up} read to the end) in {batches} batches: clients done in "
          f"{closed - start:.2f} s; peak active {peak['active']}, peak waiting "
          f"{peak['waiting']}, peak cache {peak['cache_bytes'] / 2**20:.1f} MiB; drained "
          f"{drained - closed:.2f} s after the last client; {after_close:.0f} tokens generated "
          f"after it")
    assert peak["active"] > 1, "the streams never shared a batch"
    assert after_close < 300, after_close   # a leaked endless request would run to 1500
    for kind, chunks, events, last in results:
        if chunks is None:   # read to the end: the stream ended properly
            if kind == "responses":
                assert json.loads(last)["type"] in ("response.completed", "response.incomplete")
            else:
                assert last == "[DONE]", (kind, last)
        else:
            assert events == chunks, (kind, chunks, events)
    r = httpx.post(nano_server + CHAT, json=chat(temperature=0, max_tokens=20), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# -- a full queue ------------------------------------------------------------------------------

def test_full_queue_gets_503() -> None:
    """One decoding, one waiting; the rest are turned away at once. Each admitted request needs
    its whole 60-token budget (the JSON schema cannot be met sooner), so the first is still
    running when the others arrive."""
    with run_server("--max-batch", "1", "--max-queue", "1", "--max-model-len", "1024") as url:
        n = 6
        barrier = threading.Barrier(n)
        out: list = [None] * n

        def one(i: int) -> None:
            body = chat(max_tokens=60, temperature=0, stream=i % 2 == 1,
                        response_format={"type": "json_schema",
                                         "json_schema": {"name": "a", "schema": ENDLESS}})
            with httpx.Client(base_url=url, timeout=120) as c:
                barrier.wait()
                with c.stream("POST", CHAT, json=body) as r:
                    r.read()
                    out[i] = r

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert all(r is not None for r in out), out
        statuses = sorted(r.status_code for r in out)
        print(f"\n[queue] max-batch 1, max-queue 1, {n} concurrent: statuses {statuses} in "
              f"{time.perf_counter() - start:.2f} s")
        rejected = [r for r in out if r.status_code == 503]
        admitted = [(i, r) for i, r in enumerate(out) if r.status_code != 503]
        assert rejected, statuses
        assert len(admitted) >= 2, statuses   # the running one and the waiting one
        for r in rejected:
            assert_error(r, 503, code="server_overloaded", type_="server_error",
                         mentions="capacity")
        for i, r in admitted:
            assert r.status_code == 200, r.text[:300]
            if i % 2 == 0:
                body = r.json()
                assert body["usage"]["completion_tokens"] == 60
                assert body["choices"][0]["finish_reason"] == "length"
            else:
                assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
                assert '"finish_reason": "length"' in r.text
        health = httpx.get(url + "/health", timeout=30).json()
        assert (health["active"], health["waiting"]) == (0, 0), health
        ok = httpx.post(url + CHAT, json=chat(temperature=0), timeout=60)
        assert ok.status_code == 200, ok.text

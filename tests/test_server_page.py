"""The chat page `ossgpt serve` shows at /, in a real browser: Debian's Chromium driven by
Playwright, against a real server of nano on a loopback port started with --api-key, so the page
has to ask for the key (and once against the suite's shared server, which has none). The tests
save screenshots in tests/artifacts/page/ for a person to look at."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import openai
import pytest

try:  # openai >= 3 ships the client as httpx2
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from conftest import run_server
from ossgpt.demo_tools import DEMO_TOOLS, run_tool

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                               "(pip install -e '.[test]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to drive (Debian: apt-get "
                                "install chromium, as .ci/run does); playwright's own browser "
                                "download is not used")

KEY = "sk-page-test"
SHOTS = Path(__file__).parent / "artifacts" / "page"
LAST = ".msg.assistant:last-child"


@pytest.fixture(scope="module")
def server() -> str:
    with run_server("--api-key", KEY, "--dtype", "float32", "--max-model-len", "4096",
                    "--store", ":memory:") as url:
        yield url


@pytest.fixture(scope="module")
def api(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def _open(browser, server: str, key: str | None):
    """A fresh browser profile (empty localStorage; holding `key` if given) on the page. Every
    request the page makes is recorded, and so is every error in its console."""
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    if key:
        context.add_init_script(f"localStorage.setItem('ossgpt.apiKey', {json.dumps(json.dumps(key))})")
    page = context.new_page()
    page.requests, page.errors = [], []
    page.on("request", lambda r: page.requests.append(r.url))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and page.errors.append(m.text))
    page.goto(server + "/")
    return context, page


@pytest.fixture
def page(browser, server: str):
    """The page, with the API key already in the browser, ready for a question."""
    context, page = _open(browser, server, KEY)
    page.wait_for_selector("body[data-state=idle]")
    yield page
    # Everything came from the server itself (no CDN), and nothing went wrong in the console.
    assert [u for u in page.requests if not u.startswith(server + "/")] == []
    assert page.errors == []
    context.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / f"{name}.png")
    print(f"screenshot: {SHOTS / name}.png")


def settings(page, temperature: float = 0, tools: bool = False) -> None:
    page.fill("#temperature", str(temperature))
    page.set_checked("#tools", tools)


def ask(page, question: str) -> None:
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")
    assert page.get_attribute("body", "data-state") == "busy"


def wait_done(page) -> None:
    page.wait_for_selector("body[data-state=idle]", timeout=60_000)


def api_answer(api: openai.OpenAI, *questions: str) -> str:
    """The server's greedy answer to these user messages, as the page sends them (its default
    effort, medium): what the page must show, whatever nano gets right."""
    reply = api.chat.completions.create(model="nano", temperature=0, reasoning_effort="medium",
                                        messages=[{"role": "user", "content": q} for q in questions])
    assert reply.choices[0].message.content
    return reply.choices[0].message.content


def generated_tokens(server: str) -> float:
    text = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    return float(re.search(r"^ossgpt_generation_tokens_total (\S+)$", text, re.M).group(1))


def test_page_and_its_files_load_without_the_key(server: str) -> None:
    r = httpx.get(server + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    sources = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert sorted(sources) == ["data:,", "page/chat.css", "page/chat.js", "page/markdown.js"]
    for name in ("chat.css", "chat.js", "markdown.js"):
        f = httpx.get(f"{server}/page/{name}", timeout=30)
        assert f.status_code == 200 and "://" not in f.text, name
    assert httpx.get(server + "/page/app.py", timeout=30).status_code == 404
    # The API, and the demo tools the page runs, still need the key.
    assert httpx.get(server + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(server + "/demo/tools", timeout=30).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server + "/demo/tools", headers=auth, timeout=30).json() == DEMO_TOOLS
    r = httpx.post(server + "/demo/tools/get_weather", content='{"city": "Paris"}', headers=auth,
                   timeout=30)
    assert r.json() == {"output": run_tool("get_weather", '{"city": "Paris"}')}
    r = httpx.post(server + "/demo/tools/rm", content="{}", headers=auth, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_page_asks_for_the_api_key(browser, server: str) -> None:
    context, page = _open(browser, server, None)
    try:
        page.wait_for_selector("#key-dialog[open]")
        assert page.get_attribute("body", "data-state") == "loading"
        page.fill("#key-input", "wrong")
        page.press("#key-input", "Enter")
        page.wait_for_selector("#key-error:text('refused')")
        shot(page, "api-key")
        page.fill("#key-input", KEY)
        page.click("#key-dialog button[type=submit]")
        page.wait_for_selector("body[data-state=idle]")
        assert not page.is_visible("#key-dialog")
        assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["nano"]
        page.reload()  # the key is kept in the browser
        page.wait_for_selector("body[data-state=idle]")
        assert not page.is_visible("#key-dialog")
    finally:
        context.close()


def test_page_without_a_key_on_the_server(browser, nano_server: str, client: openai.OpenAI) -> None:
    context, page = _open(browser, nano_server, None)
    try:
        page.wait_for_selector("body[data-state=idle]")
        assert not page.is_visible("#key-dialog") and not page.is_visible("#key-button")
        settings(page, temperature=0)
        ask(page, "What is 12 + 30?")
        wait_done(page)
        assert page.inner_text(f"{LAST} .content") == api_answer(client, "What is 12 + 30?")
        assert page.errors == []
    finally:
        context.close()


def test_page_streams_an_answer_and_opens_its_reasoning(page, api: openai.OpenAI) -> None:
    question = "What is the capital of Peru?"
    settings(page, temperature=0)
    # Every length the reply's text goes through as it is shown.
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const reply = document.querySelector('.msg.assistant');
            const n = reply ? reply.textContent.length : 0;
            if (n && n !== window.lengths.at(-1)) window.lengths.push(n);
        }).observe(document.getElementById('messages'),
                   {subtree: true, childList: true, characterData: true});
    }""")
    ask(page, question)
    wait_done(page)
    lengths = page.evaluate("window.lengths")
    print("lengths of the reply as shown:", lengths)
    assert len(lengths) >= 5 and lengths == sorted(lengths), lengths   # it streamed in
    expected = api.chat.completions.create(
        model="nano", messages=[{"role": "user", "content": question}], temperature=0,
        reasoning_effort="medium").choices[0].message
    assert page.inner_text(f"{LAST} .content") == expected.content
    assert "Lima" in expected.content
    # The reasoning is there, folded; a click opens it.
    assert page.inner_text(f"{LAST} .reasoning summary") == "Reasoning"
    assert not page.is_visible(f"{LAST} .reasoning .text")
    page.click(f"{LAST} .reasoning summary")
    assert page.is_visible(f"{LAST} .reasoning .text")
    assert page.text_content(f"{LAST} .reasoning .text") == expected.reasoning
    shot(page, "answer-with-reasoning")


def test_page_stops_a_generation_midway(page, server: str, api: openai.OpenAI) -> None:
    question = "What is 348 + 275?"
    settings(page, temperature=0)
    full = api.chat.completions.create(model="nano", temperature=0,
                                       messages=[{"role": "user", "content": question}])
    before = generated_tokens(server)
    # Stop is pressed the moment the first words show, from inside the page: a click from here
    # trails the page by tens of milliseconds, and a fast CPU writes nano's whole reply in that.
    # The page can be idle again before ask() reads "busy", so the state is read at the press.
    page.evaluate("""last => new MutationObserver((_, observer) => {
        if (document.querySelector(last + " .reasoning .text")?.textContent) {
            observer.disconnect();
            window.stateAtStop = document.body.dataset.state;
            document.querySelector("#stop").click();
        }
    }).observe(document.body, {childList: true, subtree: true, characterData: true})""", LAST)
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")
    wait_done(page)
    assert page.evaluate("window.stateAtStop") == "busy"
    assert page.inner_text(f"{LAST} .note") == "Stopped."
    page.click(f"{LAST} .reasoning summary")
    shot(page, "stopped")
    # What was shown is the start of the whole reply, cut short ...
    reasoning = page.text_content(f"{LAST} .reasoning .text")
    assert 0 < len(reasoning) < len(full.choices[0].message.reasoning)
    assert full.choices[0].message.reasoning.startswith(reasoning)
    # ... and the server stopped generating it: fewer tokens than the whole reply has.
    deadline = time.time() + 10
    while httpx.get(server + "/health", timeout=30).json()["active"] and time.time() < deadline:
        time.sleep(0.1)
    generated = generated_tokens(server) - before
    print(f"stopped after {generated:.0f} of the reply's {full.usage.completion_tokens} tokens; "
          f"shown: {reasoning!r}")
    assert generated < full.usage.completion_tokens
    # The conversation goes on: the stopped reply, with no answer yet, is left out of it.
    ask(page, "What is 2 + 3?")
    wait_done(page)
    assert page.inner_text(f"{LAST} .content") == api_answer(api, question, "What is 2 + 3?")


def test_page_runs_a_demo_tool_call(page) -> None:
    settings(page, temperature=0, tools=True)
    ask(page, "What's the weather in Paris?")
    wait_done(page)
    call = page.locator(".msg.assistant .tool-call")
    assert call.locator(".name").inner_text() == "Calls get_weather"
    assert json.loads(call.locator(".arguments").inner_text()) == {"city": "Paris"}
    result = page.locator(".msg.tool .tool-result")
    assert result.locator("summary").inner_text() == "get_weather returned"
    result.locator("summary").click()
    assert result.locator(".output").inner_text() == run_tool("get_weather", '{"city": "Paris"}')
    answer = page.inner_text(f"{LAST} .content")
    assert "18" in answer and "cloudy" in answer, answer
    shot(page, "demo-tool-call")


MARKDOWN = """## Markdown, rendered
A list:
- **bold** and *italic*, `inline code`
- a [link](https://example.com/docs), https://example.com/bare and [another](javascript:alert(1))
  1. nested
  2. ordered

| city | °C |
|---|--:|
| Paris | 18 |
| Oslo | 3 |

```python
print("<script>alert(1)</script>")
```
<img src=x onerror="window.injected = 1"> stays text."""


def test_page_keeps_conversations_and_renders_markdown(page, api: openai.OpenAI) -> None:
    settings(page, temperature=0)
    ask(page, "What is 12 + 30?")
    wait_done(page)
    answer = api_answer(api, "What is 12 + 30?")
    assert page.inner_text(f"{LAST} .content") == answer
    # A conversation as a model with markdown would leave it in localStorage.
    page.evaluate("""text => {
        const list = JSON.parse(localStorage.getItem('ossgpt.conversations'));
        list.push({id: 'md', title: 'Markdown', messages: [
            {role: 'user', content: 'Show me markdown.'},
            {role: 'assistant', content: text, reasoning: 'Some **reasoning** <b>as text</b>.'}]});
        localStorage.setItem('ossgpt.conversations', JSON.stringify(list));
    }""", MARKDOWN)
    page.reload()
    page.wait_for_selector("body[data-state=idle]")
    titles = page.locator("#conversations .open")
    assert titles.all_inner_texts() == ["What is 12 + 30?", "Markdown"]
    assert page.inner_text(f"{LAST} .content") == answer    # the current one, reopened
    titles.nth(1).click()
    md = page.locator(f"{LAST} .content")
    assert md.locator("h2").inner_text() == "Markdown, rendered"
    assert md.locator("ul > li").count() == 2 and md.locator("ul ol > li").count() == 2
    assert md.locator("strong").inner_text() == "bold" and md.locator("em").inner_text() == "italic"
    assert md.locator("a").evaluate_all("as => as.map(a => a.href)") == [
        "https://example.com/docs", "https://example.com/bare"]
    assert "[another](javascript:alert(1))" in md.inner_text()
    assert md.locator("tbody tr").count() == 2
    assert md.locator("td").nth(1).evaluate("td => td.style.textAlign") == "right"
    assert md.locator(".code pre code").inner_text() == 'print("<script>alert(1)</script>")'
    # Model text never becomes markup: no element came from it, and nothing ran.
    assert page.locator("#messages img, #messages script, #messages b").count() == 0
    assert '<img src=x onerror="window.injected = 1"> stays text.' in md.inner_text()
    assert page.evaluate("window.injected") is None
    page.click(f"{LAST} .reasoning summary")
    shot(page, "markdown")
    page.emulate_media(color_scheme="dark")
    shot(page, "markdown-dark")
    # New chat, then deleting a conversation.
    page.click("#new-chat")
    assert page.locator("#messages .msg").count() == 0
    first = page.locator("#conversations li").nth(0)
    first.hover()    # the delete button shows on hover
    first.locator(".delete").click()
    assert titles.all_inner_texts() == ["Markdown"]
    stored = page.evaluate("JSON.parse(localStorage.getItem('ossgpt.conversations'))")
    assert [c["title"] for c in stored] == ["Markdown"]

"""Durable Responses (ossgpt/server/store.py): stored responses survive a restart and `kill -9`;
GET, input_items and DELETE behave as OpenAI's, driven by the real `openai` client."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from ossgpt.errors import OssgptError
from ossgpt.server.store import ResponseStore, input_items


def _response(rid: str) -> dict:
    return {"id": rid, "object": "response", "created_at": 1, "status": "completed", "output": []}


def test_store_keeps_responses_in_its_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "responses.sqlite"          # folders made as needed
    store = ResponseStore(path)
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    store.put(_response("resp_1"), conversation, input_items("Hi"))
    store.close()
    again = ResponseStore(path)
    assert again.get("resp_1") == _response("resp_1")
    assert again.conversation("resp_1") == conversation
    [item] = again.input_items("resp_1")["data"]
    assert item["type"] == "message" and item["role"] == "user" and item["id"].startswith("msg_")
    assert item["content"] == [{"type": "input_text", "text": "Hi"}]
    assert again.delete("resp_1") == {"id": "resp_1", "object": "response", "deleted": True}
    with pytest.raises(Exception) as e:
        again.get("resp_1")
    assert e.value.status == 404 and "resp_1" in e.value.message
    with pytest.raises(Exception) as e:
        again.conversation("resp_1")
    assert e.value.param == "previous_response_id" and e.value.code == "previous_response_not_found"


def test_input_items_page_as_openai_does() -> None:
    store = ResponseStore()
    items = input_items([{"role": "user", "content": str(i)} for i in range(5)])
    store.put(_response("r"), [], items)
    ids = [i["id"] for i in items]
    page = store.input_items("r", limit=2)                     # newest first by default
    assert [i["id"] for i in page["data"]] == ids[::-1][:2] and page["has_more"]
    assert page["first_id"] == ids[4] and page["last_id"] == ids[3]
    rest = store.input_items("r", limit=10, after=page["last_id"])
    assert [i["id"] for i in rest["data"]] == ids[::-1][2:] and not rest["has_more"]
    assert [i["id"] for i in store.input_items("r", order="asc")["data"]] == ids
    for bad in ({"limit": 0}, {"order": "up"}, {"after": "msg_nope"}):
        with pytest.raises(Exception) as e:
            store.input_items("r", **bad)
        assert e.value.status == 400 and e.value.param == next(iter(bad))


def test_a_file_that_is_not_a_store_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not a database, but some notes a user keeps\n" * 100)
    with pytest.raises(OssgptError, match="notes.txt"):
        ResponseStore(bad)
    assert bad.read_text().startswith("not a database")           # left as it was
    done = subprocess.run([sys.executable, "-m", "ossgpt", "serve", "--store", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: --store") and "notes.txt" in done.stderr


def _start(store: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ossgpt", "serve", "--port", str(port), "--store", str(store)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, "ossgpt serve exited"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            assert time.time() < deadline, "ossgpt serve did not come up"
            time.sleep(0.2)


def test_responses_survive_kill_9_and_delete_as_openai(tmp_path: Path) -> None:
    store = tmp_path / "responses.sqlite"
    proc, url = _start(store)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        first = client.responses.create(model="nano", input="What is 348 + 275?", temperature=0,
                                        reasoning={"effort": "low"})
        events = client.responses.create(model="nano", input="What is the capital of Peru?",
                                         temperature=0, stream=True)
        streamed = next(e.response for e in events if e.type == "response.completed")
        unstored = client.responses.create(model="nano", input="Hi", store=False, max_output_tokens=8)
    finally:
        proc.send_signal(signal.SIGKILL)                          # no shutdown, no flush
        proc.wait()

    proc, url = _start(store)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        for before in (first, streamed):
            after = client.responses.retrieve(before.id)
            assert after.model_dump() == before.model_dump()
            [item] = client.responses.input_items.list(before.id).data
            assert item.role == "user"
        # each conversation goes on from where it was, with its history
        follow = client.responses.create(model="nano", previous_response_id=first.id, temperature=0,
                                         input="And what is 623 + 1?")
        assert follow.previous_response_id == first.id and follow.status == "completed"
        assert follow.usage.input_tokens > first.usage.input_tokens
        client.responses.create(model="nano", previous_response_id=streamed.id, input="Thanks!", max_output_tokens=8)

        with pytest.raises(openai.NotFoundError) as e:
            client.responses.retrieve(unstored.id)              # store: false kept nothing
        assert e.value.body["message"] == f"Response with id '{unstored.id}' not found."

        client.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError) as e:
            client.responses.retrieve(first.id)
        assert e.value.body["type"] == "invalid_request_error"
        with pytest.raises(openai.NotFoundError):
            client.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError) as e:
            client.responses.create(model="nano", previous_response_id=first.id, input="More")
        assert e.value.body["param"] == "previous_response_id"
        assert client.responses.retrieve(follow.id).id == follow.id     # the rest untouched
    finally:
        proc.terminate()
        proc.wait(30)

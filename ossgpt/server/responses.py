"""POST /v1/responses: the Responses API. Input items (messages, function calls and their
outputs, reasoning items that clients replay) become chat messages, rendered with harmony; the
reply becomes output items (reasoning, message, function_call). Streaming sends the standard
event sequence, ending in exactly one response.completed / response.incomplete / response.failed.

Stored responses (`previous_response_id`, GET and DELETE) live in a ResponseStore (store.py)."""

from __future__ import annotations

import asyncio
import time
import uuid

from ..harmony import ToolCall, render_prompt
from ..tools.builtin import call_entry, is_builtin, tool_message
from .generation import (Limits, ReplyRun, make_constraint, resolve_tool_choice, sampling_params,
                         submit, token_budget, tokenizing)
from .builtin_tools import (MAX_TOOL_CALLS, SEARCH_SCHEMA, TOOL_TYPES, BuiltinTools, Citations,
                            builtin_call_names, call_item, replay_messages)
from .protocol import APIError, ResponsesRequest
from .store import ResponseStore, input_items


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def input_messages(items: str | list[dict]) -> list[dict]:
    """Responses input -> OpenAI chat messages (what harmony.render_prompt takes)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    reasoning: list[str] = []

    def assistant() -> dict:
        # Calls, text and replayed reasoning of one turn gather on one assistant message.
        if not messages or messages[-1]["role"] != "assistant" or messages[-1].get("content"):
            messages.append({"role": "assistant", "content": ""})
        if reasoning:
            messages[-1]["reasoning"] = "\n".join(reasoning)
            reasoning.clear()
        return messages[-1]

    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"input[{i}].role must be user, system, developer or "
                                    f"assistant, not {role!r}", param=f"input[{i}].role")
            if role == "assistant":
                assistant()["content"] = _text(item.get("content"))
            else:
                messages.append({"role": role, "content": _text(item.get("content"))})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning.append(_text(parts))
        elif kind == "function_call":
            if not item.get("name") or "call_id" not in item:
                raise APIError(400, f"input[{i}]: a function_call needs name and call_id",
                               param=f"input[{i}]")
            assistant().setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": item.get("arguments", "{}")}})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id", ""),
                             "content": output if isinstance(output, str) else _text(output)})
        elif kind in ("web_search_call", "code_interpreter_call"):
            turn = replay_messages(item, i)
            call = assistant()
            call.setdefault("tool_calls", []).extend(turn[0]["tool_calls"])
            messages.extend(turn[1:])
        elif kind == "item_reference":
            raise APIError(400, f"input[{i}]: item_reference is not supported; send the item",
                           param=f"input[{i}]")
        else:
            raise APIError(400, f"input[{i}]: unknown item type {kind!r}", param=f"input[{i}].type")
    return messages


def _tools(req: ResponsesRequest):
    tools = [t for t in req.tools or [] if t.type == "function"]
    other = [t.type for t in req.tools or [] if t.type != "function" and t.type not in TOOL_TYPES]
    if other:
        raise APIError(400, f"tools: function, web_search_preview (web_search) and "
                            f"code_interpreter tools are supported, not {other[0]!r}",
                       param="tools")
    for i, t in enumerate(tools):
        if not t.name:
            raise APIError(400, f"tools[{i}].name is required", param=f"tools[{i}].name")
    chat_tools = [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                  for t in tools]
    schemas = {t.name: t.parameters for t in tools}
    choice = req.tool_choice
    if isinstance(choice, dict) and TOOL_TYPES.get(choice.get("type")) == "browser":
        # a forced web search: the first round must call browser.search
        if not any(TOOL_TYPES.get(t.type) == "browser" for t in req.tools or []):
            raise APIError(400, f"tool_choice names {choice['type']!r}, which is not among the "
                                "tools", param="tool_choice")
        return chat_tools, {**schemas, "browser.search": SEARCH_SCHEMA}, "browser.search"
    return chat_tools, schemas, resolve_tool_choice(schemas, choice)


def _json_schema(req: ResponsesRequest) -> dict | None:
    fmt = (req.text or {}).get("format") or {}
    if fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        return {}
    if fmt["type"] == "json_schema" and isinstance(fmt.get("schema"), dict):
        return fmt["schema"]
    raise APIError(400, "text.format must be text, json_object or json_schema with a schema",
                   param="text.format")


class ResponsesAPI:
    def __init__(self, engine, limits: Limits, store: ResponseStore,
                 builtin: BuiltinTools | None = None) -> None:
        self.engine, self.limits, self.store = engine, limits, store
        self.builtin = builtin or BuiltinTools()

    def prepare(self, req: ResponsesRequest, adapter: str | None = None) -> dict:
        history = self.store.conversation(req.previous_response_id) if req.previous_response_id else []
        messages = history + input_messages(req.input)
        tools, schemas, choice = _tools(req)
        builtin = self.builtin.requested(req.tools)
        effort = (req.reasoning.effort if req.reasoning else None) or "medium"
        # Built-in tools the history called are declared too, so their calls render as the
        # model wrote them; only the requested ones run.
        used = {"python" if c["function"]["name"] == "python" else "browser"
                for m in messages for c in m.get("tool_calls") or []
                if is_builtin(c.get("function", {}).get("name", ""))}
        p = {"messages": messages, "id": _id("resp"), "created": int(time.time()),
             "declared": builtin + sorted(used - set(builtin)),
             "effort": effort, "tool_choice": req.tool_choice or "auto", "tools": tools,
             "schemas": schemas, "choice": choice, "json_schema": _json_schema(req),
             "builtin": builtin, "adapter": adapter, "rounds": [], "session": None}
        if builtin:  # the chain's browser pages and python interpreter
            p["session"] = self.builtin.session(self.builtin.chain(p["id"],
                                                                   req.previous_response_id))
        self._submit(req, p)
        return p

    def _submit(self, req: ResponsesRequest, p: dict) -> bool:
        """Render the conversation so far and start generating the next round of the reply;
        False (nothing started) when the output budget is spent."""
        with tokenizing("input"):
            prompt = render_prompt(p["messages"], reasoning_effort=p["effort"],
                                   developer=req.instructions, tools=p["tools"] or None,
                                   builtin_tools=p["declared"])
        requested = req.max_output_tokens
        if p["rounds"]:   # after a tool call: what is left of the budget and of the context
            used = sum(run.completion_tokens for _, run in p["rounds"])
            room = self.limits.max_model_len - len(prompt)
            requested = min(room, room if requested is None else requested - used)
            if requested <= 0:
                return False
        budget = token_budget(prompt, requested, self.limits, "max_output_tokens")
        schemas, choice = p["schemas"], p["choice"]
        if choice == "browser.search" and p["rounds"]:   # forced once, then free
            schemas, choice = {k: v for k, v in schemas.items() if k != choice}, "auto"
        constraint = make_constraint(schemas, choice, p["json_schema"])
        seq = submit(self.engine, prompt, budget,
                     sampling_params(req.temperature, req.top_p, req.seed), constraint,
                     adapter=p["adapter"])
        p["rounds"].append((prompt, ReplyRun(self.engine, seq,
                                             builtin=builtin_call_names(p["builtin"]))))
        return True

    def response(self, req: ResponsesRequest, p: dict, status: str, output: list[dict]) -> dict:
        rounds = p["rounds"]
        incomplete = status == "incomplete"
        input_tokens = sum(len(prompt) for prompt, _ in rounds)
        output_tokens = sum(run.completion_tokens for _, run in rounds)
        return {
            "id": p["id"], "object": "response", "created_at": p["created"], "status": status,
            "model": req.model, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls,
            "metadata": req.metadata or {}, "parallel_tool_calls": True,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": p["effort"], "summary": None},
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "text": req.text or {"format": {"type": "text"}},
            "tool_choice": p["tool_choice"],
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "store": req.store, "truncation": "disabled", "user": None,
            "usage": {"input_tokens": input_tokens,
                      "input_tokens_details": {"cached_tokens": sum(run.seq.cached_tokens
                                                                    for _, run in rounds)},
                      "output_tokens": output_tokens,
                      "output_tokens_details": {"reasoning_tokens": sum(
                          run.reasoning_tokens for _, run in rounds)},
                      "total_tokens": input_tokens + output_tokens}}

    def _finish(self, req: ResponsesRequest, p: dict, output: list[dict], status: str) -> dict:
        run: ReplyRun = p["rounds"][-1][1]
        response = self.response(req, p, status, output)
        if req.store:
            turn: dict = {"role": "assistant", "content": run.content}
            if run.reasoning:
                turn["reasoning"] = run.reasoning
            calls = [o for o in output if o["type"] == "function_call"]
            if calls:
                turn["tool_calls"] = [{"id": c["call_id"], "type": "function",
                                       "function": {"name": c["name"], "arguments": c["arguments"]}}
                                      for c in calls]
            self.store.put(response, p["messages"] + [turn], input_items(req.input))
        return response

    async def create(self, req: ResponsesRequest, adapter: str | None = None) -> dict:
        """The whole response: what the stream's last event carries."""
        last = None
        async for last in self.stream(req, adapter):
            pass
        if last["type"] == "response.failed":
            raise APIError(500, last["response"]["error"]["message"])
        return last["response"]

    async def stream(self, req: ResponsesRequest, adapter: str | None = None):
        """Event dicts, each with its type and sequence_number. With built-in tools, a reply
        ending in a call to one is a round: the call is run, its result appended, and the
        next round generated, up to max_tool_calls calls."""
        p = self.prepare(req, adapter)
        session = p["session"]
        seq_no = 0

        def event(kind: str, **fields) -> dict:
            nonlocal seq_no
            seq_no += 1
            return {"type": kind, "sequence_number": seq_no - 1, **fields}

        output: list[dict] = []
        current: dict | None = None   # the output item being streamed
        cite: Citations | None = None  # its citations, when a message of a browsing response
        yield event("response.created", response=self.response(req, p, "in_progress", []))
        yield event("response.in_progress", response=self.response(req, p, "in_progress", []))

        def text_events(text: str, annotations: list[dict]) -> list[dict]:
            """Message text (citations already made links) and its new annotations."""
            part, i = current["content"][0], len(output) - 1
            events = []
            if text:
                part["text"] += text
                events.append(event("response.output_text.delta", item_id=current["id"],
                                    output_index=i, content_index=0, delta=text, logprobs=[]))
            for a in annotations:
                part["annotations"].append(a)
                events.append(event("response.output_text.annotation.added",
                                    item_id=current["id"], output_index=i, content_index=0,
                                    annotation_index=len(part["annotations"]) - 1, annotation=a))
            return events

        def close() -> list[dict]:
            """Events that finish the current item."""
            item, i = current, len(output) - 1
            item["status"] = "completed"
            if item["type"] == "reasoning":
                text = item["content"][0]["text"]
                item["summary"] = [{"type": "summary_text", "text": text}]
                return [event("response.reasoning_text.done", item_id=item["id"], output_index=i,
                              content_index=0, text=text),
                        event("response.output_item.done", output_index=i, item=item)]
            if item["type"] == "message":
                events = text_events(*cite.flush()) if cite is not None else []
                part = item["content"][0]
                return events + [
                    event("response.output_text.done", item_id=item["id"], output_index=i,
                          content_index=0, text=part["text"], logprobs=[]),
                    event("response.content_part.done", item_id=item["id"], output_index=i,
                          content_index=0, part=part),
                    event("response.output_item.done", output_index=i, item=item)]
            return [event("response.function_call_arguments.done", item_id=item["id"],
                          output_index=i, arguments=item["arguments"], name=item["name"]),
                    event("response.output_item.done", output_index=i, item=item)]

        status = "completed"
        calls_made = 0
        max_calls = MAX_TOOL_CALLS if req.max_tool_calls is None else req.max_tool_calls
        try:
            while True:
                run: ReplyRun = p["rounds"][-1][1]
                async for piece in run.pieces():
                    if piece.kind in ("call", "arguments") and is_builtin(run.calls[piece.call]["name"]):
                        continue   # run once the round is over (a call ends it)
                    kind = {"reasoning": "reasoning", "content": "message"}.get(piece.kind, "function_call")
                    if current is None or current["type"] != kind or piece.kind == "call":
                        if current is not None:
                            for e in close():
                                yield e
                        if kind == "reasoning":
                            current = _reasoning_item(_id("rs"), "", "in_progress")
                        elif kind == "message":
                            current = _message_item(_id("msg"), "", "in_progress")
                            cite = Citations(session.browser) if session and session.browser else None
                        else:
                            current = _call_item(_id("fc"), _id("call"), piece.text, "", "in_progress")
                        output.append(current)
                        i = len(output) - 1
                        added = dict(current, content=[]) if kind == "message" else current
                        yield event("response.output_item.added", output_index=i, item=added)
                        if kind == "message":
                            yield event("response.content_part.added", item_id=current["id"],
                                        output_index=i, content_index=0,
                                        part={"type": "output_text", "text": "", "annotations": []})
                    i = len(output) - 1
                    if kind == "reasoning":
                        current["content"][0]["text"] += piece.text
                        yield event("response.reasoning_text.delta", item_id=current["id"],
                                    output_index=i, content_index=0, delta=piece.text)
                    elif kind == "message":
                        for e in text_events(*(cite.push(piece.text) if cite is not None
                                               else (piece.text, []))):
                            yield e
                    elif piece.kind == "arguments":
                        current["arguments"] += piece.text
                        yield event("response.function_call_arguments.delta", item_id=current["id"],
                                    output_index=i, delta=piece.text)
                if current is not None:
                    for e in close():
                        yield e
                    current = None
                if run.finish_reason == "length":
                    status = "incomplete"
                    break
                pending = [c for c in run.calls if is_builtin(c["name"])]
                if not pending:
                    break
                call = ToolCall(pending[0]["name"], pending[0]["arguments"],
                                pending[0]["channel"], pending[0]["content_type"])
                if calls_made >= max_calls:   # reported, not run; the response ends here
                    item = call_item(call, session, "incomplete")
                    output.append(item)
                    yield event("response.output_item.added", output_index=len(output) - 1, item=item)
                    yield event("response.output_item.done", output_index=len(output) - 1, item=item)
                    break
                calls_made += 1
                result: list[str] = []
                async for e in self._run_call(call, session, output, event, result):
                    yield e
                turn: dict = {"role": "assistant", "content": run.content,
                              "tool_calls": [call_entry(output[-1]["id"], call)]}
                if run.reasoning:
                    turn["reasoning"] = run.reasoning
                p["messages"] = p["messages"] + [
                    turn, dict(tool_message(call, result[0]), tool_call_id=output[-1]["id"])]
                if not self._submit(req, p):
                    status = "incomplete"
                    break
        except APIError as e:
            failed = self.response(req, p, "failed", output)
            failed["error"] = {"code": "server_error", "message": e.message}
            yield event("response.failed", response=failed)
            return
        final = self._finish(req, p, output, status)
        yield event(f"response.{final['status']}", response=final)

    async def _run_call(self, call: ToolCall, session, output: list[dict], event,
                        result: list[str]):
        """Run a built-in call on the server, with its item's events in OpenAI's order; the
        tool's text goes into `result`."""
        item = call_item(call, session, "in_progress")
        output.append(item)
        i, kind = len(output) - 1, item["type"]
        yield event("response.output_item.added", output_index=i, item=dict(item))
        yield event(f"response.{kind}.in_progress", item_id=item["id"], output_index=i)
        if kind == "code_interpreter_call":
            yield event("response.code_interpreter_call_code.delta", item_id=item["id"],
                        output_index=i, delta=call.arguments)
            yield event("response.code_interpreter_call_code.done", item_id=item["id"],
                        output_index=i, code=call.arguments)
            yield event("response.code_interpreter_call.interpreting", item_id=item["id"],
                        output_index=i)
        else:
            yield event("response.web_search_call.searching", item_id=item["id"],
                        output_index=i)
        # the tools block (a search, a python run of up to its wall limit): off the event loop
        text = await asyncio.to_thread(self.builtin.run, session, call)
        result.append(text)
        output[i] = item = call_item(call, session, "completed", text, item["id"])
        yield event(f"response.{kind}.completed", item_id=item["id"], output_index=i)
        yield event("response.output_item.done", output_index=i, item=item)


def _reasoning_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"type": "reasoning", "id": item_id, "status": status,
            "summary": [{"type": "summary_text", "text": text}] if status == "completed" else [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _message_item(item_id: str, text: str, status: str) -> dict:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}

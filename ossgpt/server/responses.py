"""POST /v1/responses: the Responses API. Input items (messages, function calls and their
outputs, reasoning items that clients replay) become chat messages, rendered with harmony; the
reply becomes output items (reasoning, message, function_call). Streaming sends the standard
event sequence, ending in exactly one response.completed / response.incomplete / response.failed.

Stored responses (`previous_response_id`, GET and DELETE) live in a ResponseStore (store.py)."""

from __future__ import annotations

import time
import uuid

from ..harmony import render_prompt
from .generation import (Limits, ReplyRun, make_constraint, resolve_tool_choice, sampling_params,
                         submit, token_budget, tokenizing)
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
        elif kind == "item_reference":
            raise APIError(400, f"input[{i}]: item_reference is not supported; send the item",
                           param=f"input[{i}]")
        else:
            raise APIError(400, f"input[{i}]: unknown item type {kind!r}", param=f"input[{i}].type")
    return messages


def _tools(req: ResponsesRequest):
    tools = [t for t in req.tools or [] if t.type == "function"]
    if len(tools) != len(req.tools or []):
        other = next(t.type for t in req.tools if t.type != "function")
        raise APIError(400, f"tools: only function tools are supported, not {other!r}",
                       param="tools")
    for i, t in enumerate(tools):
        if not t.name:
            raise APIError(400, f"tools[{i}].name is required", param=f"tools[{i}].name")
    chat_tools = [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                  for t in tools]
    schemas = {t.name: t.parameters for t in tools}
    return chat_tools, schemas, resolve_tool_choice(schemas, req.tool_choice)


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
    def __init__(self, engine, limits: Limits, store: ResponseStore) -> None:
        self.engine, self.limits, self.store = engine, limits, store

    def prepare(self, req: ResponsesRequest, adapter: str | None = None) -> dict:
        history = self.store.conversation(req.previous_response_id) if req.previous_response_id else []
        messages = history + input_messages(req.input)
        tools, schemas, choice = _tools(req)
        json_schema = _json_schema(req)
        effort = (req.reasoning.effort if req.reasoning else None) or "medium"
        with tokenizing("input"):
            prompt = render_prompt(messages, reasoning_effort=effort, developer=req.instructions,
                                   tools=tools or None)
        budget = token_budget(prompt, req.max_output_tokens, self.limits, "max_output_tokens")
        constraint = make_constraint(schemas, choice, json_schema)
        seq = submit(self.engine, prompt, budget,
                     sampling_params(req.temperature, req.top_p, req.seed), constraint,
                     adapter=adapter)
        return {"run": ReplyRun(self.engine, seq), "messages": messages, "prompt": prompt,
                "id": _id("resp"), "created": int(time.time()), "effort": effort,
                "tool_choice": req.tool_choice or "auto"}

    def response(self, req: ResponsesRequest, p: dict, status: str, output: list[dict]) -> dict:
        run: ReplyRun = p["run"]
        incomplete = status == "incomplete"
        return {
            "id": p["id"], "object": "response", "created_at": p["created"], "status": status,
            "model": req.model, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {}, "parallel_tool_calls": True,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": p["effort"], "summary": None},
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "text": req.text or {"format": {"type": "text"}},
            "tool_choice": p["tool_choice"],
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "store": req.store, "truncation": "disabled", "user": None,
            "usage": {"input_tokens": len(p["prompt"]),
                      "input_tokens_details": {"cached_tokens": run.seq.cached_tokens},
                      "output_tokens": run.completion_tokens,
                      "output_tokens_details": {"reasoning_tokens": run.reasoning_tokens},
                      "total_tokens": len(p["prompt"]) + run.completion_tokens}}

    def _finish(self, req: ResponsesRequest, p: dict, output: list[dict]) -> dict:
        run: ReplyRun = p["run"]
        response = self.response(req, p, "incomplete" if run.finish_reason == "length" else "completed", output)
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
        p = self.prepare(req, adapter)
        run: ReplyRun = await p["run"].run()
        output = []
        if run.reasoning:
            output.append(_reasoning_item(_id("rs"), run.reasoning))
        if run.content:
            output.append(_message_item(_id("msg"), run.content, "completed"))
        for call in run.calls:
            output.append(_call_item(_id("fc"), _id("call"), call["name"], call["arguments"],
                                     "completed"))
        return self._finish(req, p, output)

    async def stream(self, req: ResponsesRequest, adapter: str | None = None):
        """Event dicts, each with its type and sequence_number."""
        p = self.prepare(req, adapter)
        run: ReplyRun = p["run"]
        seq_no = 0

        def event(kind: str, **fields) -> dict:
            nonlocal seq_no
            seq_no += 1
            return {"type": kind, "sequence_number": seq_no - 1, **fields}

        output: list[dict] = []
        current: dict | None = None   # the output item being streamed
        yield event("response.created", response=self.response(req, p, "in_progress", []))
        yield event("response.in_progress", response=self.response(req, p, "in_progress", []))

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
                part = item["content"][0]
                return [event("response.output_text.done", item_id=item["id"], output_index=i,
                              content_index=0, text=part["text"], logprobs=[]),
                        event("response.content_part.done", item_id=item["id"], output_index=i,
                              content_index=0, part=part),
                        event("response.output_item.done", output_index=i, item=item)]
            return [event("response.function_call_arguments.done", item_id=item["id"],
                          output_index=i, arguments=item["arguments"], name=item["name"]),
                    event("response.output_item.done", output_index=i, item=item)]

        try:
            async for piece in run.pieces():
                kind = {"reasoning": "reasoning", "content": "message"}.get(piece.kind, "function_call")
                if current is None or current["type"] != kind or piece.kind == "call":
                    if current is not None:
                        for e in close():
                            yield e
                    if kind == "reasoning":
                        current = _reasoning_item(_id("rs"), "", "in_progress")
                    elif kind == "message":
                        current = _message_item(_id("msg"), "", "in_progress")
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
                    current["content"][0]["text"] += piece.text
                    yield event("response.output_text.delta", item_id=current["id"],
                                output_index=i, content_index=0, delta=piece.text, logprobs=[])
                elif piece.kind == "arguments":
                    current["arguments"] += piece.text
                    yield event("response.function_call_arguments.delta", item_id=current["id"],
                                output_index=i, delta=piece.text)
            if current is not None:
                for e in close():
                    yield e
        except APIError as e:
            failed = self.response(req, p, "failed", output)
            failed["error"] = {"code": "server_error", "message": e.message}
            yield event("response.failed", response=failed)
            return
        final = self._finish(req, p, output)
        yield event(f"response.{final['status']}", response=final)


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

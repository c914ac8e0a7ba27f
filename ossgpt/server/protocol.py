"""Request bodies of the OpenAI API as pydantic models, and errors in the OpenAI shape.

The models validate types and ranges (a bad field is a 400 naming it) and allow fields we do
not use, as OpenAI's own server and other engines do, so clients sending newer fields work."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool


class APIError(Exception):
    """An error response: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionDef(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Body):
    type: Literal["function"]
    function: FunctionDef


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


ToolChoice = Literal["none", "auto", "required"] | dict[str, Any]
Effort = Literal["low", "medium", "high"]


class Sampling(_Body):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None


class ChatCompletionRequest(Sampling):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: StrictBool = False   # strict: "yes" or 1 is a 400, not a stream
    stream_options: StreamOptions | None = None
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    reasoning_effort: Effort | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None


class ResponsesTool(_Body):
    type: str
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Reasoning(_Body):
    effort: Effort | None = None
    summary: str | None = None


class ResponsesRequest(Sampling):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: ToolChoice | None = None
    reasoning: Reasoning | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream: StrictBool = False   # strict: "yes" or 1 is a 400, not a stream
    previous_response_id: str | None = None
    max_tool_calls: int | None = Field(None, ge=0)
    store: bool = True
    text: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class CompletionRequest(Sampling):
    model: str
    prompt: str | list[str] | list[int]
    max_tokens: int = Field(16, ge=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: StrictBool = False   # strict: "yes" or 1 is a 400, not a stream
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

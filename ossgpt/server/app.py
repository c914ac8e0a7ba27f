"""The HTTP layer: FastAPI routes over the engine, API-key checks, OpenAI-shaped errors, SSE.

Every failure a request can cause comes back as {"error": {...}} with a 4xx status; anything
unexpected is a 500 in the same shape. The engine thread outlives any single request."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from . import chat_completions, completions, page
from .builtin_tools import BuiltinTools
from .engine import Engine
from .generation import Limits
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, ResponsesRequest
from .responses import ResponsesAPI
from .store import ResponseStore

MAX_BODY_BYTES = 4 << 20


def _error(status: int, message: str, **kw) -> JSONResponse:
    return JSONResponse(APIError(status, message, **kw).body(), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    param = ".".join(loc) or None
    if param is None:  # the body itself: missing, or JSON that is not an object
        return f"The request body must be a JSON object ({first.get('msg')}).", None
    return f"{param}: {first.get('msg')}", param


_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models"}


def _route_label(path: str) -> str:
    """The metrics label of a path: a fixed set, so clients cannot add series at will."""
    if path in _ROUTES:
        return path
    return "/v1/models/{name}" if path.startswith("/v1/models/") else "other"


class _BodyLimit:
    """Counts a request body as it arrives, so one sent without Content-Length (chunked) is
    refused past the limit too instead of being read whole (the guard checks Content-Length)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        total = 0

        async def limited():
            nonlocal total
            message = await receive()
            total += len(message.get("body", b""))
            if total > self.limit:
                # Raised inside FastAPI's body reading, which lets HTTPException through.
                raise HTTPException(413, f"Request body over {self.limit} bytes.")
            return message

        await self.app(scope, limited, send)


def create_app(model, model_name: str = "nano", *, api_key: str | None = None,
               max_batch: int = 16, max_model_len: int | None = None,
               max_queue: int = 256, adapters: dict[str, str] | None = None,
               batch_invariant: bool = False, store: str | ResponseStore = ":memory:",
               prefix_cache_gb: float = 0.0, prefill_chunk: int = 256,
               builtin_tools: BuiltinTools | None = None) -> FastAPI:
    """`adapters`: LoRA adapters (name -> PEFT directory) served beside the base model; a
    request picks one by sending its name as `model`. `batch_invariant`: each request's tokens
    depend on its prompt and seed alone, not on what shares the batch (engine.py). `store`: the
    SQLite file (or an open ResponseStore) that keeps stored responses across restarts
    (store.py); ":memory:" keeps them for this app's life. `builtin_tools`: the browser backend
    and python tool the Responses API runs for requests listing web_search_preview or
    code_interpreter (builtin_tools.py); None: neither."""
    if adapters:
        from ..lora import load_adapters
        load_adapters(model, adapters)
    served = [model_name, *(adapters or {})]
    metrics = Metrics()
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, metrics=metrics,
                    batch_invariant=batch_invariant, prefill_chunk=prefill_chunk,
                    prefix_cache_bytes=int(prefix_cache_gb * 2**30))
    context = model.config.initial_context_length * (model.config.rope_scaling_factor or 1)
    limits = Limits(min(max_model_len or context, context))
    stored = store if isinstance(store, ResponseStore) else ResponseStore(store)
    builtin = builtin_tools or BuiltinTools()
    responses = ResponsesAPI(engine, limits, stored, builtin)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.shutdown()
        stored.close()
        builtin.close()

    app = FastAPI(title="ossgpt", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.limits = engine, metrics, limits
    created = int(time.time())

    # Inside the guard (added first): the guard, a BaseHTTPMiddleware, would wrap its 413 in an
    # ExceptionGroup, which FastAPI's body reading turns into a 400.
    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        status = 500
        try:
            if api_key and path != "/health" and not page.is_public(path):
                auth = request.headers.get("authorization", "")
                if not hmac.compare_digest(auth.encode(), f"Bearer {api_key}".encode()):
                    status = 401
                    return _error(401, "Invalid or missing API key (Authorization: Bearer KEY).",
                                  code="invalid_api_key")
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
                status = 413
                return _error(413, f"Request body over {MAX_BODY_BYTES} bytes.",
                              code="request_too_large")
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.requests.labels(_route_label(path), str(status)).inc()

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = {"Not Found": f"Unknown route: {request.method} {request.url.path}",
                   "Method Not Allowed": f"Method {request.method} is not allowed on "
                                         f"{request.url.path}"}.get(exc.detail, str(exc.detail))
        return _error(exc.status_code, message,
                      code={404: "not_found", 413: "request_too_large"}.get(exc.status_code))

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    def check_model(name: str) -> str | None:
        """-> the adapter a model name asks for (None: the base model)."""
        if name not in served:
            raise APIError(404, f"The model {name!r} does not exist; this server serves "
                                f"{', '.join(map(repr, served))}.", param="model",
                           code="model_not_found")
        return None if name == model_name else name

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(name, created) for name in served]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        check_model(name)
        return _model_card(name, created)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        adapter = check_model(req.model)
        prompt, settings = chat_completions.prepare(req, limits)
        settings["adapter"] = adapter
        if req.stream:
            events = chat_completions.stream(engine, req, req.model, prompt, settings)
            return await _sse(events, request)
        return await _unless_disconnected(
            chat_completions.complete(engine, req, req.model, prompt, settings), request)

    @app.post("/v1/completions")
    async def complete(req: CompletionRequest, request: Request):
        adapter = check_model(req.model)
        prompt, budget, stops = completions.prepare(req, limits)
        if req.stream:
            return await _sse(completions.stream(engine, req, req.model, prompt, budget, stops,
                                                 adapter), request)
        return await _unless_disconnected(
            completions.complete(engine, req, req.model, prompt, budget, stops, adapter), request)

    @app.post("/v1/responses")
    async def respond(req: ResponsesRequest, request: Request):
        adapter = check_model(req.model)
        if req.stream:
            return await _sse(responses.stream(req, adapter), request, done=False, named=True)
        return await _unless_disconnected(responses.create(req, adapter), request)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        return stored.get(response_id)

    @app.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(response_id: str, limit: int = 20, order: str = "desc", after: str | None = None):
        return stored.input_items(response_id, limit, order, after)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        return stored.delete(response_id)

    page.add_routes(app)
    return app


async def _unless_disconnected(work, request: Request):
    """Await `work`, cancelling it (and so its generation) if the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return Response(status_code=499)
    finally:
        task.cancel()


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "ossgpt"}


async def _sse(events: AsyncIterator[dict], request: Request, done: bool = True,
               named: bool = False) -> StreamingResponse:
    """Server-sent events. The first event is produced before the response starts, so a bad
    request still gets a plain JSON error status instead of a broken stream."""
    first = await anext(events, None)

    async def body():
        try:
            item = first
            while item is not None:
                prefix = f"event: {item['type']}\n" if named else ""
                yield f"{prefix}data: {json.dumps(item, ensure_ascii=False)}\n\n"
                item = await anext(events, None)
            if done:
                yield "data: [DONE]\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

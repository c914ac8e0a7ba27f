"""The chat page `ossgpt serve` shows at `/`, and the demo-tool routes it uses.

The page is plain files in this folder (HTML, CSS, two scripts), shipped in the package and
served as they are: no build step, no CDN, so it works on a machine without a network. It talks
to the server's own `/v1/chat/completions` as any client does; the only routes made for it are
`/demo/tools` (the demo tools' definitions) and `POST /demo/tools/{name}` (run one), because the
demo tools are Python (`ossgpt.demo_tools`) and a copy of them in JavaScript could drift from
what nano was trained on."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import Response

from ...demo_tools import DEMO_TOOLS, run_tool
from ..protocol import APIError

_FILES = {"chat.css": "text/css", "chat.js": "text/javascript", "markdown.js": "text/javascript"}

# Defence in depth beside the page's rule of only ever putting model text in text nodes: no
# inline script runs, and nothing loads from or talks to anywhere but this server.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def is_public(path: str) -> bool:
    """The page and its files load without the API key: the page is what asks for it."""
    return path == "/" or path.startswith("/page/")


def _read(name: str) -> bytes:
    return resources.files(__name__).joinpath(name).read_bytes()


def add_routes(app: FastAPI) -> None:
    @app.get("/")
    async def chat_page():
        return Response(_read("index.html"), media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"})

    @app.get("/page/{name}")
    async def page_file(name: str):
        if name not in _FILES:
            raise APIError(404, f"No page file {name!r}.", code="not_found")
        return Response(_read(name), media_type=_FILES[name] + "; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})

    @app.get("/demo/tools")
    async def demo_tools():
        return DEMO_TOOLS

    @app.post("/demo/tools/{name}")
    async def demo_tool(name: str, request: Request):
        """The body is the call's arguments (JSON text, as the model wrote them); the answer,
        {"output": TEXT}, is what goes back to the model as the tool message's content."""
        if name not in {t["function"]["name"] for t in DEMO_TOOLS}:
            raise APIError(404, f"No demo tool {name!r}.", code="not_found")
        arguments = (await request.body()).decode(errors="replace")
        return {"output": run_tool(name, arguments)}

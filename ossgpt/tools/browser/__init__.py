"""The browser tool of gpt-oss: `browser.search`, `browser.open` and `browser.find` over a local
folder of documents (LocalCorpus, the default) or the web (WebBackend), in the page format the
model was trained on. `BrowserTool.call(name, arguments)` runs one call of the model's."""

from .backend import Backend, BackendError, Document, SearchResult
from .local import LocalCorpus
from .tool import BrowserTool, Citation
from .web import WebBackend

__all__ = ["Backend", "BackendError", "BrowserTool", "Citation", "Document", "LocalCorpus",
           "SearchResult", "WebBackend"]

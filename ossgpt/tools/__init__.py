"""The built-in tools gpt-oss was trained with, as the model calls them: the browser (browser/) and the sandboxed python notebook (python.py, sandbox.py)."""

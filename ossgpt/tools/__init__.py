"""Tools the model calls while it answers: the built-in browser and python tools of gpt-oss."""

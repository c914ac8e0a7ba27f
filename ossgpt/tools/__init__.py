"""Built-in tools gpt-oss was trained with: their execution side (python, browser)."""

"""Synthetic harmony conversations for training and evaluating the nano demo model.

`tasks` generates seeded conversations by family (arithmetic, capitals, strings, tools,
refusal, small talk) with a seed-independent train/test split; `examples` renders them into
tokens and a loss mask exactly as `ossgpt chat` renders prompts, and scores model replies.
"""

from .examples import gold_turn, prompt_tokens, render_example, render_options, score, trained_turns
from .tasks import DEFAULT_WEIGHTS, FAMILIES, TEST_SIZE, Example, examples, is_test_key, mixture

__all__ = ["DEFAULT_WEIGHTS", "FAMILIES", "TEST_SIZE", "Example", "examples", "gold_turn",
           "is_test_key", "mixture", "prompt_tokens", "render_example", "render_options", "score",
           "trained_turns"]

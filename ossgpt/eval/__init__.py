"""Evaluations of ossgpt models: `ossgpt eval`, and adapters through which lm-evaluation-harness
(`lm_eval_adapter`) and inspect_ai (`inspect_adapter`) drive them."""

"""Merging gpt-oss checkpoints and LoRA adapters (`ossgpt merge`): mergekit's configs and
methods, MoE-aware, with MXFP4 experts dequantized, merged in float32 and re-quantized."""

"""Converting gpt-oss checkpoints (`ossgpt convert`): between the original/ and Hugging Face
layouts, losslessly, and to and from GGUF for llama.cpp, Ollama and LM Studio."""

"""lmforge: train GPT/Llama-style language models end to end."""

__version__ = "0.1.0"

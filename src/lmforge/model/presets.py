"""Named model shapes as plain data. Each cites where its shape comes from.

``vocab_size`` is the preset's own; a run that trains its own tokenizer takes the tokenizer's size
unless ``model.vocab_size`` is set explicitly.
"""

from lmforge.config import ModelConfig

# A ~1M-parameter Llama-style model that trains on a laptop CPU in minutes (our own choice).
TINY = ModelConfig(
    preset="tiny", vocab_size=2048, max_seq_len=256, n_layers=4, d_model=128, n_heads=4, ffn_hidden=384
)

# GPT-2 small (Radford et al. 2019; Hugging Face `gpt2` config.json): 124,439,808 parameters.
GPT2_124M = ModelConfig(
    preset="gpt2-124m",
    vocab_size=50257,
    max_seq_len=1024,
    n_layers=12,
    d_model=768,
    n_heads=12,
    ffn_hidden=3072,
    position="learned",
    ffn="gelu",
    norm="layernorm",
    bias=True,
    tie_embeddings=True,
)

# JackFram/llama-160m (the small Llama used for speculative decoding research): 12 x 768, 3072 SwiGLU.
LLAMA_160M = ModelConfig(
    preset="llama-160m",
    vocab_size=32000,
    max_seq_len=2048,
    n_layers=12,
    d_model=768,
    n_heads=12,
    ffn_hidden=3072,
    norm_eps=1e-6,
    tie_embeddings=False,
)

# TinyLlama-1.1B (Zhang et al. 2024): 22 layers, 2048 wide, 32 heads with 4 key/value heads (GQA).
LLAMA_1B = ModelConfig(
    preset="1b",
    vocab_size=32000,
    max_seq_len=2048,
    n_layers=22,
    d_model=2048,
    n_heads=32,
    n_kv_heads=4,
    ffn_hidden=5632,
    tie_embeddings=False,
)

# OpenLLaMA 3B (Geng & Liu 2023, the Llama architecture at 3B): 26 layers, 3200 wide, 32 heads.
LLAMA_3B = ModelConfig(
    preset="3b",
    vocab_size=32000,
    max_seq_len=2048,
    n_layers=26,
    d_model=3200,
    n_heads=32,
    ffn_hidden=8640,
    norm_eps=1e-6,
    tie_embeddings=False,
)

# Llama-2-7B (Touvron et al. 2023; meta-llama/Llama-2-7b-hf config.json): 6,738,415,616 parameters.
LLAMA_7B = ModelConfig(
    preset="7b",
    vocab_size=32000,
    max_seq_len=4096,
    n_layers=32,
    d_model=4096,
    n_heads=32,
    ffn_hidden=11008,
    tie_embeddings=False,
)

PRESETS: dict[str, ModelConfig] = {
    "tiny": TINY,
    "gpt2-124m": GPT2_124M,
    "llama-160m": LLAMA_160M,
    "1b": LLAMA_1B,
    "3b": LLAMA_3B,
    "7b": LLAMA_7B,
}

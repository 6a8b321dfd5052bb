"""The Hugging Face families lmforge converts: each ``architectures`` class name and its ``model_type``.

Plain data without torch, so that the CLI can name the families in its help without importing the model;
``model/hf.py`` and ``model/hf_moe.py`` convert them.
"""

from __future__ import annotations

LLAMA = "LlamaForCausalLM"
QWEN2 = "Qwen2ForCausalLM"
QWEN3 = "Qwen3ForCausalLM"
MISTRAL = "MistralForCausalLM"
MIXTRAL = "MixtralForCausalLM"
QWEN2_MOE = "Qwen2MoeForCausalLM"
QWEN3_MOE = "Qwen3MoeForCausalLM"
GPT2 = "GPT2LMHeadModel"

MOE_ARCHITECTURES = (MIXTRAL, QWEN2_MOE, QWEN3_MOE)
MODEL_TYPES = {
    LLAMA: "llama",
    QWEN2: "qwen2",
    QWEN3: "qwen3",
    MISTRAL: "mistral",
    MIXTRAL: "mixtral",
    QWEN2_MOE: "qwen2_moe",
    QWEN3_MOE: "qwen3_moe",
    GPT2: "gpt2",
}


def family_list() -> str:
    """The importable ``model_type`` values as prose: "llama, qwen2, ... and gpt2"."""
    types = list(MODEL_TYPES.values())
    return f"{', '.join(types[:-1])} and {types[-1]}"

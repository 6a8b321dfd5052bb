"""Greedy generation of a GPT-2-style model (learned positions, LayerNorm, GELU, biases) against transformers'
GPT2LMHeadModel with the same weights, single prompts and a left-padded batch."""

import pytest
import torch

from lmforge.infer.generate import SamplingConfig, generate_ids
from tests.conftest import require_transformers

from .conftest import tiny_model

CPU = torch.device("cpu")
PAD = 256
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 101, 102], [33] * 12, [7]]
GPT2 = dict(position="learned", ffn="gelu", norm="layernorm", bias=True, n_kv_heads=None)


def gpt2_model(tie: bool):
    model = tiny_model(seed=3, tie_embeddings=tie, **GPT2)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # biases and norm weights away from their 0/1 init, so every switch is exercised
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def hf_greedy(hf, prompts, max_new_tokens):
    """transformers' greedy generate on a left-padded batch (its position ids come from the attention mask)."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), PAD)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    out = hf.generate(
        ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD
    )
    return [row[longest:].tolist() for row in out]


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_greedy_generation_matches_transformers(tie):
    require_transformers()
    from lmforge.model.hf import to_hf_model

    model = gpt2_model(tie)
    hf = to_hf_model(model)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    greedy = SamplingConfig(max_new_tokens=20, temperature=0.0)
    batch = generate_ids(model, PROMPTS, greedy, device=CPU, pad_id=PAD).tokens
    assert len({tuple(t) for t in batch}) == len(PROMPTS)  # distinct continuations: the check has teeth
    for prompt, ours in zip(PROMPTS, batch, strict=True):
        assert hf_greedy(hf, [prompt], greedy.max_new_tokens) == [ours], prompt
    assert hf_greedy(hf, PROMPTS, greedy.max_new_tokens) == batch  # left padding: positions from the mask

"""The fast decoding step (``lmforge.infer.fast``) against the eager path (``Transformer.hidden_states`` with a
``KVCache``, itself tested against transformers): the same greedy tokens on 20 prompts for every family of
the one Transformer, the same seeded samples, and the compiled step on one family."""

import pytest
import torch

from lmforge.config import ModelConfig, MoEConfig
from lmforge.infer.fast import CACHE_BUCKET, FastDecoder, cache_length, decode_step
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.model.transformer import KVCache, build_model

CPU = torch.device("cpu")
VOCAB = 97


def config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB, max_seq_len=64, n_layers=2, d_model=48, n_heads=4, n_kv_heads=2, ffn_hidden=80
    )
    return ModelConfig(**{**base, "init_std": 0.3, "tie_embeddings": False, **overrides})


FAMILIES = {
    "llama-gqa": config(),
    "llama-tied-mqa": config(n_kv_heads=1, tie_embeddings=True),
    "gpt2": config(position="learned", ffn="gelu", norm="layernorm", bias=True, n_kv_heads=None),
    "sinusoidal": config(position="sinusoidal", ffn="gelu", norm="layernorm"),
    "qwen2-qkv-bias": config(qkv_bias=True),
    "qwen3-qk-norm": config(qk_norm=True, head_size=16),
    "mistral-window": config(sliding_window=6),
    "llama3-rope": config(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=16, rope_theta=500.0),
    "yarn-rope": config(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=16),
    "mixtral-moe": config(moe=MoEConfig(n_experts=4, top_k=2)),
    "qwen2-moe-shared": config(
        moe=MoEConfig(
            n_experts=4, top_k=2, n_shared_experts=1, shared_expert_gate=True, router="softmax_topk"
        ),
        qkv_bias=True,
    ),
    "mup": config(mup=True, mup_base_width=16),
}


def prompts(n: int = 20, seed: int = 5) -> list[list[int]]:
    """``n`` prompts of 1 to 30 tokens (different lengths: batches are left-padded)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 31, (n,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (length,), generator=g).tolist() for length in lengths]


def both(model, batch, sampling, **kwargs):
    eager = generate_ids(model, batch, sampling, device=CPU, **kwargs)
    fast = generate_ids(model, batch, sampling, device=CPU, decoder=FastDecoder(model), **kwargs)
    return eager, fast


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fast_greedy_equals_eager_on_20_prompts(family):
    model = build_model(FAMILIES[family], seed=3).eval()
    greedy = SamplingConfig(max_new_tokens=24, temperature=0.0)
    all_prompts = prompts()
    eager_tokens, fast_tokens = [], []
    for first in range(0, 20, 5):  # batches of 5 prompts of different lengths
        eager, fast = both(model, all_prompts[first : first + 5], greedy)
        eager_tokens += eager.tokens
        fast_tokens += fast.tokens
        assert fast.finish_reasons == eager.finish_reasons
    assert fast_tokens == eager_tokens
    assert len({tuple(t) for t in eager_tokens}) > 10  # the outputs differ by prompt: not a trivial match
    single_eager, single_fast = both(model, [all_prompts[0]], greedy)  # batch 1, no padding
    assert single_fast.tokens == single_eager.tokens


def test_fast_seeded_sampling_equals_eager():
    """Sampling stays outside the step on the same device with the same generator: the same draws."""
    model = build_model(FAMILIES["llama-gqa"], seed=3).eval()
    sampling = SamplingConfig(
        max_new_tokens=20, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2, seed=11
    )
    eager, fast = both(model, prompts(6), sampling)
    assert fast.tokens == eager.tokens
    other = generate_ids(model, prompts(6), SamplingConfig(**{**sampling.__dict__, "seed": 12}), device=CPU)
    assert other.tokens != eager.tokens  # the seed matters: the match above is not vacuous


def test_fast_step_logits_match_the_eager_step():
    """Logits, not only argmaxes: one step after a padded prompt batch, window in force."""
    model = build_model(FAMILIES["mistral-window"], seed=4).eval()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second row is left-padded
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        eager_cache = KVCache.empty(model.cfg, 2, 16, device=CPU, dtype=torch.float32)
        fast_cache = KVCache.empty(model.cfg, 2, 16, device=CPU, dtype=torch.float32)
        for cache in (eager_cache, fast_cache):
            model.hidden_states(ids, attention_mask=mask, position_ids=positions, cache=cache)
        token = torch.tensor([[5], [7]])
        position = positions[:, -1:] + 1
        expected = model.lm_head(model.hidden_states(token, position_ids=position, cache=eager_cache)[:, -1])
        got = FastDecoder(model).step(fast_cache, token, position, torch.tensor([9]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_cache.keys[1][:, :, :10], eager_cache.keys[1][:, :, :10])


def test_cache_length_rounds_only_when_compiled():
    assert cache_length(70, compiled=False) == 70
    assert cache_length(70, compiled=True) == CACHE_BUCKET
    assert cache_length(CACHE_BUCKET + 1, compiled=True) == 2 * CACHE_BUCKET


def test_compiled_step_gives_the_eager_tokens():
    """One family, a handful of tokens: inductor's compile costs a minute on a busy CPU."""
    model = build_model(FAMILIES["llama-gqa"], seed=3).eval()
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    batch = prompts(3)
    compiled = FastDecoder(model, compile=True)
    assert compiled._step is not decode_step
    eager = generate_ids(model, batch, greedy, device=CPU)
    fast = generate_ids(model, batch, greedy, device=CPU, decoder=compiled)
    assert fast.tokens == eager.tokens

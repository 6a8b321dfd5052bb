"""The fused block (model/fused.py): the same outputs and gradients as the plain modules and as `transformers`,
applied only to the blocks it fits, and the plain math wherever a call needs it (no gradients, a KV cache)."""

import copy

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model import transformer
from lmforge.model.fused import FusedBlock, apply_fused_blocks
from lmforge.model.transformer import Block, KVCache, build_model, rope_cos_sin
from lmforge.tune.lora import LoRAConfig, apply_lora
from tests.conftest import require_transformers

VOCAB = 61


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, max_seq_len=32, n_layers=2, d_model=64, n_heads=4, ffn_hidden=96)
    return ModelConfig(**{**base, **overrides})


def perturbed_model(cfg: ModelConfig) -> transformer.Transformer:
    """Random weights with non-trivial norm weights (initialisation leaves them at 1, hiding a mix-up)."""
    model = build_model(cfg, seed=1).train()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return model


def tokens(seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 32), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(
    model: torch.nn.Module, idx: torch.Tensor, **kwargs
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(idx, **kwargs)  # (B, T, V)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_close_grads(grads: dict, reference: dict, rel: float) -> None:
    assert grads.keys() == reference.keys()
    for name, ref in reference.items():
        err = (grads[name] - ref).abs().max() / ref.abs().max()
        assert err <= rel, f"{name}: relative gradient error {err:.2e} > {rel:.0e}"


def fused_copy(model: transformer.Transformer) -> transformer.Transformer:
    fused = copy.deepcopy(model)
    assert apply_fused_blocks(fused) == len(fused.layers)
    assert all(type(block) is FusedBlock for block in fused.layers)
    assert fused.state_dict().keys() == model.state_dict().keys()
    return fused


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # multi-head, grouped-query, multi-query attention
def test_fused_block_matches_plain_modules(kv_heads):
    model = perturbed_model(tiny(n_kv_heads=kv_heads))
    fused = fused_copy(model)
    rope = rope_cos_sin(torch.arange(32)[None], model.rope_inv_freq)
    out = fused.layers[0](torch.randn(3, 32, 64), rope, None)  # (B, T, C)
    assert type(out.grad_fn).__name__ == "_MLPSublayerBackward"  # the fused path ran
    idx = tokens()
    logits, grads = loss_and_grads(fused, idx)
    plain_logits, plain_grads = loss_and_grads(model, idx)
    assert (logits - plain_logits).abs().max() <= 1e-5
    assert_close_grads(grads, plain_grads, 1e-5)


def test_fused_block_with_packed_documents_matches_plain_modules():
    model = perturbed_model(tiny())
    fused = fused_copy(model)
    idx = tokens(seed=6)
    doc_ids = torch.tensor([[0] * 10 + [1] * 22, [0] * 32, [0] * 5 + [1] * 5 + [2] * 22])  # (B, T)
    logits, grads = loss_and_grads(fused, idx, doc_ids=doc_ids)
    plain_logits, plain_grads = loss_and_grads(model, idx, doc_ids=doc_ids)
    assert (logits - plain_logits).abs().max() <= 1e-5
    assert_close_grads(grads, plain_grads, 1e-5)
    first_doc_alone, _ = loss_and_grads(fused, idx[:1, :10])  # attention stays inside each document
    assert (logits[:1, :10] - first_doc_alone).abs().max() <= 1e-5


def test_fused_block_gradients_match_transformers():
    from lmforge.model.hf import to_hf_model

    require_transformers()
    model = perturbed_model(tiny(tie_embeddings=False))
    hf_model = to_hf_model(model).train()
    fused = fused_copy(model)
    idx = tokens(seed=9)
    logits, grads = loss_and_grads(fused, idx)
    hf_model.zero_grad(set_to_none=True)
    hf_model(input_ids=idx, labels=idx).loss.backward()  # the same next-token loss (labels shift inside)
    hf_grads = {n: p.grad for n, p in hf_model.named_parameters()}
    for name, grad in grads.items():
        hf_name = name if name == "lm_head.weight" else "model." + name
        err = (grad - hf_grads[hf_name]).abs().max() / hf_grads[hf_name].abs().max()
        assert err <= 1e-4, f"{name}: relative gradient error against transformers {err:.2e}"


def test_without_gradients_or_with_a_cache_the_fused_model_runs_the_plain_math():
    """Evaluation, export checks and decoding: bit for bit the plain model (and so transformers)."""
    from lmforge.model.hf import to_hf_model

    require_transformers()
    model = perturbed_model(tiny(tie_embeddings=False)).eval()
    fused = fused_copy(model)
    idx = tokens(seed=4)
    with torch.no_grad():
        logits = fused(idx)
        assert torch.equal(logits, model(idx))
        hf_logits = to_hf_model(model).float()(input_ids=idx).logits
    assert (logits - hf_logits).abs().max() <= 1e-4

    def decode(m: transformer.Transformer) -> torch.Tensor:  # gradients on: only the cache says "plain"
        cache = KVCache.empty(m.cfg, 3, 32, device=torch.device("cpu"), dtype=torch.float32)
        m(idx[:, :20], cache=cache)  # a prefill into a cache
        return m(idx[:, 20:21], cache=cache).detach()  # one step against the cached keys

    assert torch.equal(decode(fused), decode(model))


@pytest.mark.parametrize("case", ["dropout", "bias", "layernorm", "gelu", "learned positions", "lora"])
def test_blocks_the_fused_math_does_not_fit_stay_plain(case):
    cfg = {
        "dropout": tiny(dropout=0.1),
        "bias": tiny(bias=True),
        "layernorm": tiny(norm="layernorm"),
        "gelu": tiny(ffn="gelu"),
        "learned positions": tiny(position="learned"),
    }.get(case, tiny())
    model = build_model(cfg, seed=1).train()
    if case == "lora":
        model = apply_lora(model, LoRAConfig(rank=2, targets=("q_proj", "v_proj")))
    assert apply_fused_blocks(model) == 0
    assert all(type(block) is Block for block in model.layers)


def test_only_the_blocks_that_fit_are_fused():
    model = build_model(tiny(), seed=1)
    model.layers[1] = apply_lora(model.layers[1], LoRAConfig(rank=2, targets=("q_proj",)))
    assert apply_fused_blocks(model) == 1
    assert [type(block) for block in model.layers] == [FusedBlock, Block]
    assert apply_fused_blocks(model) == 0  # applying twice changes nothing

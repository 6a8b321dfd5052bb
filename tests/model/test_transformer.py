"""The Transformer's masking, positions, cache and pooling, each compared with an independent computation."""

import math

import pytest
import torch

from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.config import Config, ModelConfig
from lmforge.model.transformer import (
    KVCache,
    SequenceClassifier,
    Transformer,
    apply_rope,
    build_model,
    rope_cos_sin,
    rope_inv_freq,
)

TOL = 1e-5


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, max_seq_len=64, n_layers=2, d_model=64, n_heads=4, ffn_hidden=96)
    return ModelConfig(**{**base, **overrides})


LLAMA_GQA = tiny(n_kv_heads=2)
GPT2_STYLE = tiny(position="learned", ffn="gelu", norm="layernorm", bias=True)
SINUSOIDAL = tiny(position="sinusoidal", ffn="gelu", norm="layernorm")
ALL_POSITIONS = [LLAMA_GQA, GPT2_STYLE, SINUSOIDAL]
IDS = ["rope-gqa", "learned", "sinusoidal"]


def model_for(cfg: ModelConfig) -> Transformer:
    return build_model(cfg, seed=0).eval()


def tokens(*shape: int, seed: int = 0, vocab: int = 61) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", ALL_POSITIONS, ids=IDS)
@torch.no_grad()
def test_changing_token_t_changes_no_earlier_output(cfg):
    model = model_for(cfg)
    idx = tokens(2, 20)
    for t in (0, 7, 19):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
        a, b = model(idx), model(changed)
        assert torch.equal(a[:, :t], b[:, :t])
        assert (a[:, t] - b[:, t]).abs().max() > 1e-4  # the change is visible at t itself


def test_sinusoidal_table_equals_closed_form():
    cfg = tiny(position="sinusoidal", max_seq_len=50, d_model=32, n_heads=4)
    table = model_for(cfg).sinusoidal
    d = cfg.d_model
    expected = torch.tensor(
        [
            [
                math.sin(p / 10000 ** (j / d)) if j % 2 == 0 else math.cos(p / 10000 ** ((j - 1) / d))
                for j in range(d)
            ]
            for p in range(cfg.max_seq_len)
        ],
        dtype=torch.float64,
    )
    assert table.shape == (50, 32)
    assert (table.double() - expected).abs().max() < 1e-6
    assert table[0, 0] == 0.0 and table[0, 1] == 1.0  # sin(0) on even, cos(0) on odd dimensions


@torch.no_grad()
def test_rope_scores_depend_only_on_relative_offset():
    model = model_for(tiny(rope_theta=100.0))
    attn = model.layers[0].self_attn
    a, b = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    q = attn.q_proj(a).view(1, 4, 1, 16)  # (B, H, 1, hd)
    k = attn.k_proj(b).view(1, 4, 1, 16)

    def scores(m: int, n: int) -> torch.Tensor:
        inv_freq = rope_inv_freq(16, 100.0)
        qm = apply_rope(q, *rope_cos_sin(torch.tensor([[m]]), inv_freq))
        kn = apply_rope(k, *rope_cos_sin(torch.tensor([[n]]), inv_freq))
        return (qm * kn).sum(-1).flatten()  # (H,)

    for offset in (0, 3, -5):
        reference = scores(10 + offset, 10)
        for shift in (1, 17, 40):
            assert torch.allclose(scores(10 + offset + shift, 10 + shift), reference, atol=1e-5)
    assert (scores(13, 10) - scores(10, 10)).abs().max() > 1e-3  # the offset itself matters


@pytest.mark.parametrize("cfg", ALL_POSITIONS, ids=IDS)
@torch.no_grad()
def test_document_mask_equals_running_each_document_alone(cfg):
    model = model_for(cfg)
    lengths = [5, 9, 1, 7]
    docs = [tokens(1, n, seed=i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)  # (1, 22)
    doc_ids = torch.cat([torch.full((1, n), 100 + i) for i, n in enumerate(lengths)], dim=1)
    out = model(packed, doc_ids=doc_ids)
    alone = torch.cat([model(d) for d in docs], dim=1)
    assert (out - alone).abs().max() < TOL
    assert (model(packed) - alone).abs().max() > 1e-3  # without the mask documents do see each other


@pytest.mark.parametrize("cfg", ALL_POSITIONS, ids=IDS)
@torch.no_grad()
def test_padded_batch_equals_unpadded_rows(cfg):
    model = model_for(cfg)
    rows = [tokens(1, n, seed=n) for n in (12, 5, 9)]
    T = 12
    right = torch.zeros(3, T, dtype=torch.long)
    left = torch.zeros(3, T, dtype=torch.long)
    right_mask = torch.zeros(3, T, dtype=torch.long)
    left_mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        n = r.shape[1]
        right[i, :n], right_mask[i, :n] = r[0], 1
        left[i, T - n :], left_mask[i, T - n :] = r[0], 1
    left_positions = (left_mask.cumsum(1) - 1).clamp(min=0)
    out_right = model(right, attention_mask=right_mask)
    out_left = model(left, attention_mask=left_mask, position_ids=left_positions)
    for i, r in enumerate(rows):
        n = r.shape[1]
        alone = model(r)[0]
        assert (out_right[i, :n] - alone).abs().max() < TOL
        assert (out_left[i, T - n :] - alone).abs().max() < TOL


@pytest.mark.parametrize("cfg", ALL_POSITIONS, ids=IDS)
@torch.no_grad()
def test_kv_cache_incremental_logits_equal_full_forward(cfg):
    model = model_for(cfg)
    idx = tokens(2, 16)
    full = model(idx)
    cache = KVCache.empty(cfg, 2, 16, device=torch.device("cpu"), dtype=torch.float32)
    pieces = [model(idx[:, :6], cache=cache)]  # prefill
    pieces.append(model(idx[:, 6:9], cache=cache))  # a chunk after cached positions
    pieces += [model(idx[:, t : t + 1], cache=cache) for t in range(9, 16)]  # one token at a time
    assert cache.length == 16
    assert (torch.cat(pieces, dim=1) - full).abs().max() < TOL


@torch.no_grad()
def test_kv_cache_with_left_padding_equals_each_row_alone():
    cfg = LLAMA_GQA
    model = model_for(cfg)
    prompts = [tokens(1, 7, seed=3), tokens(1, 3, seed=4)]
    continuation = tokens(2, 5, seed=5)
    P = 7
    ids = torch.zeros(2, P, dtype=torch.long)
    mask = torch.zeros(2, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - p.shape[1] :], mask[i, P - p.shape[1] :] = p[0], 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = KVCache.empty(cfg, 2, P + 5, device=torch.device("cpu"), dtype=torch.float32)
    steps = [model(ids, attention_mask=mask, position_ids=positions, cache=cache)[:, -1:]]
    next_position = positions[:, -1:] + 1
    for t in range(5):
        steps.append(model(continuation[:, t : t + 1], position_ids=next_position + t, cache=cache))
    incremental = torch.cat(steps, dim=1)  # (2, 6, V): logits after the prompt, then after each new token
    for i, p in enumerate(prompts):
        alone = model(torch.cat([p, continuation[i : i + 1]], dim=1))[0, p.shape[1] - 1 :]
        assert (incremental[i] - alone).abs().max() < TOL


@torch.no_grad()
def test_pool_picks_the_last_non_pad_token():
    model = model_for(LLAMA_GQA)
    idx = tokens(3, 10)
    mask = torch.tensor([[1] * 10, [1] * 4 + [0] * 6, [1] * 1 + [0] * 9])
    hidden = model.hidden_states(idx, attention_mask=mask)
    pooled = Transformer.pool(hidden, mask)
    for row, last in enumerate((9, 3, 0)):
        assert torch.equal(pooled[row], hidden[row, last])
    assert torch.equal(Transformer.pool(hidden), hidden[:, -1])
    classifier = SequenceClassifier(model, n_classes=3).eval()
    alone = model.hidden_states(idx[1:2, :4])[0, -1]
    assert torch.allclose(classifier(idx, mask)[1], classifier.score(alone), atol=TOL)


def test_residual_projections_get_scaled_initialisation():
    cfg = tiny(n_layers=8, d_model=128, ffn_hidden=512)
    model = build_model(cfg, seed=0)
    layer = model.layers[3]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.equal(layer.input_layernorm.weight, torch.ones(128))


def test_loaded_checkpoint_keeps_the_head_tied(tmp_path):
    cfg = tiny()
    model = model_for(cfg)
    save_checkpoint(tmp_path / "ck", model_state=model.state_dict(), config=Config(model=cfg))
    loaded, _, _ = load_model(tmp_path / "ck")
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert loaded.num_params() == model.num_params()
    idx = tokens(2, 8)
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_meta_build_then_init_weights_ties_the_head():
    model = build_model(tiny(), device="meta")
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert torch.isfinite(model(tokens(1, 4))).all()

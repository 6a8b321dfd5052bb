"""The model card: every fact of the run summary appears, formatted, and missing figures read n/a."""

import dataclasses

from lmforge.config import ModelConfig
from lmforge.train.card import model_card


def summary(**changes) -> dict:
    m = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=300, max_seq_len=128)
    facts = {
        "name": "demo",
        "model": {**dataclasses.asdict(m), "kv_heads": m.kv_heads, "hidden_dim": m.hidden_dim},
        "seq_len": 64,
        "parameters": 123456,
        "sources": ["corpus/a.txt"],
        "data_report": {"kept": 3},
        "tokenizer": "run/tokenizer.json",
        "step": 20,
        "tokens": 40960,
        "lr": 3e-4,
        "schedule": "cosine",
        "weight_decay": 0.1,
        "precision": "fp32",
        "final_loss": 2.5,
        "val_loss": 2.75,
        "val_ppl": 15.642,
        "bad_steps": 1,
        "hardware": "CPU: test, 2 threads",
        "wall_seconds": 125,
    }
    return {**facts, **changes}


def test_the_card_states_the_runs_facts():
    card = model_card(summary())
    m = summary()["model"]
    assert card.startswith("# demo\n")
    expected = [
        f"- 2 layers, d_model 64, 4 heads ({m['kv_heads']} key/value), feed-forward {m['ffn']} {m['hidden_dim']}",
        "- context: 64 tokens (max 128), vocabulary: 300",
        "- parameters: 123,456",
        "- corpus/a.txt",
        '  "kept": 3',
        "- run/tokenizer.json (300 ids in the model)",
        "- steps: 20, tokens seen: 40,960",
        "- optimizer: AdamW, lr 0.0003 (cosine schedule), weight decay 0.1, precision fp32",
        "- final training loss: 2.5000",
        "- final validation loss: 2.7500 (perplexity 15.6420)",
        "- skipped (non-finite) steps: 1",
        "- hardware: CPU: test, 2 threads",
        "- wall time: 2m05s",
    ]
    lines = card.splitlines()
    assert [line for line in expected if line not in lines] == []


def test_missing_figures_read_n_a_and_missing_sources_are_said():
    card = model_card(summary(val_loss=None, val_ppl=None, sources=[], data_report=None))
    assert "- final validation loss: n/a (perplexity n/a)" in card
    assert "- (prepared data; sources not recorded)" in card and "Cleaning report" not in card

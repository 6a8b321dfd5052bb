"""MODEL_CARD.md: what a run trained, on what, how, and how well, from the run's summary."""

from __future__ import annotations

import json
from typing import Any

from lmforge.train.metrics import format_duration


def model_card(summary: dict[str, Any]) -> str:
    """MODEL_CARD.md text from a run summary (see ``train.loop.train``)."""
    m = summary["model"]
    lines = [
        f"# {summary['name']}",
        "",
        "A decoder-only Transformer language model trained with lmforge.",
        "",
        "## Architecture",
        "",
        f"- {m['n_layers']} layers, d_model {m['d_model']}, {m['n_heads']} heads "
        f"({m['kv_heads']} key/value), feed-forward {m['ffn']} {m['hidden_dim']}",
        f"- positions: {m['position']}, norm: {m['norm']}, tied embeddings: {m['tie_embeddings']}",
        f"- context: {summary['seq_len']} tokens (max {m['max_seq_len']}), vocabulary: {m['vocab_size']}",
        f"- parameters: {summary['parameters']:,}",
        "",
        "## Data",
        "",
    ]
    for source in summary.get("sources") or ["(prepared data; sources not recorded)"]:
        lines.append(f"- {source}")
    report = summary.get("data_report")
    if report:
        lines += ["", "Cleaning report:", "", "```json", json.dumps(report, indent=2)[:4000], "```"]
    lines += [
        "",
        "## Tokenizer",
        "",
        f"- {summary.get('tokenizer') or 'unknown'} ({m['vocab_size']} ids in the model)",
        "",
        "## Training",
        "",
        f"- steps: {summary['step']}, tokens seen: {summary['tokens']:,}",
        f"- optimizer: AdamW, lr {summary['lr']} ({summary['schedule']} schedule), "
        f"weight decay {summary['weight_decay']}, precision {summary['precision']}",
        f"- final training loss: {_fmt(summary.get('final_loss'))}",
        f"- final validation loss: {_fmt(summary.get('val_loss'))} (perplexity {_fmt(summary.get('val_ppl'))})",
        f"- skipped (non-finite) steps: {summary.get('bad_steps', 0)}",
        f"- hardware: {summary['hardware']}",
        f"- wall time: {format_duration(summary['wall_seconds'])}",
        "",
        "## Limitations",
        "",
        "A small model trained briefly: it imitates the surface of its training text and knows nothing reliable.",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"

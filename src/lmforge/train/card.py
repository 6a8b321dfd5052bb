"""MODEL_CARD.md: what a run trained, on what, how, how well and what it emitted, from its summary.

A fine-tuned model's card records its lineage: this stage's data files (records, examples, licences where the
data's README states them), then the base model's own card, which holds the base's data sources, cleaning
report and tokens, or its own lineage for a model fine-tuned more than once.

The card is also the README.md of an exported Hugging Face folder, so the training emissions open it as
Hugging Face's YAML metadata (``co2_eq_emissions``: grams, source, training type, location, hardware),
and the Environmental impact section says the same in prose.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from lmforge.train.metrics import format_duration


def model_card(summary: dict[str, Any]) -> str:
    """MODEL_CARD.md text from a run summary (see ``train.loop.train``)."""
    m = summary["model"]
    lines = [*_front_matter(summary.get("energy"))]
    lines += [
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
    lineage = summary.get("lineage")
    if lineage:
        lines += _stage_data(lineage)
    else:
        for source in summary.get("sources") or ["(prepared data; sources not recorded)"]:
            lines.append(f"- {source}")
    report = summary.get("data_report")
    if report and not lineage:
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
        *_environmental_impact(summary.get("energy")),
        *(_lineage(lineage) if lineage else []),
        "## Limitations",
        "",
        "A small model trained briefly: it imitates the surface of its training text and knows nothing reliable.",
        "",
    ]
    return "\n".join(lines)


def _stage_data(lineage: dict) -> list[str]:
    stage = lineage["stage"]
    lines = [f"{stage[:1].upper()}{stage[1:]} of `{lineage['base']}` on:", ""]
    for d in lineage["data"]:
        licence = d.get("licence") or "not stated (no README beside the data lists it)"
        lines.append(
            f"- `{d['path']}`: {d['records']:,} records, {d['examples']:,} examples; licence: {licence}"
        )
    lines += ["", f"Chat template: {lineage['chat_template']}", ""]
    lines += [f"- {name}: {n:,}" for name, n in lineage.get("counts", {}).items()]
    return lines


def _lineage(lineage: dict) -> list[str]:
    """The base model's card under this one, its headings two levels down."""
    base_card = lineage.get("base_card")
    lines = [
        "## Lineage",
        "",
        f"This model: {lineage['stage']} (above) of the base model `{lineage['base']}`.",
        "",
    ]
    if base_card is None:
        return lines + ["The base model has no model card, so its training data is not recorded here.", ""]
    lines += ["### Base model card", ""]
    for line in base_card.strip().splitlines():
        lines.append("##" + line if line.startswith("#") else line)
    return lines + [""]


def find_card(model_dir: str | Path) -> str | None:
    """The model card of a checkpoint folder (its own, else its run's) or of a Hugging Face folder (README.md)."""
    model_dir = Path(model_dir)
    candidates = [model_dir / "MODEL_CARD.md"]
    if model_dir.parent.name == "checkpoints":
        candidates.append(model_dir.parent.parent / "MODEL_CARD.md")
    candidates.append(model_dir / "README.md")
    for path in candidates:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return None


def data_licence(data_file: str | Path) -> str | None:
    """The licence a README.md in the data file's folder or a folder above states for it: a Markdown table
    row naming the file (relative to the README) in its first column, in a table with a "License"/"Licence"
    column. None when no README says."""
    path = Path(data_file).resolve()
    for folder in list(path.parents)[:4]:
        readme = folder / "README.md"
        if not readme.is_file():
            continue
        name = path.relative_to(folder).as_posix()
        header: list[str] = []
        for line in readme.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.startswith("|"):
                header = []
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not header:
                header = [c.lower() for c in cells]
                continue
            column = next((i for i, h in enumerate(header) if h in ("license", "licence")), None)
            if column is not None and column < len(cells) and cells[0].strip("`") == name:
                return re.sub(r"\*\*(.+?)\*\*", r"\1", cells[column])
    return None


def co2_eq_emissions(energy: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face's model-card metadata for training emissions (grams of CO2eq)."""
    return {
        "emissions": float(f"{energy['co2_g']:.6g}"),  # grams, six significant figures
        "source": f"lmforge; {energy['source']}",
        "training_type": energy["training_type"],
        "geographical_location": energy["region"],
        "hardware_used": energy["hardware"],
    }


def _front_matter(energy: dict[str, Any] | None) -> list[str]:
    if not energy:
        return []
    text = yaml.safe_dump({"co2_eq_emissions": co2_eq_emissions(energy)}, sort_keys=False, width=1000)
    return ["---", *text.rstrip("\n").splitlines(), "---", ""]


def _environmental_impact(energy: dict[str, Any] | None) -> list[str]:
    if not energy:
        return []
    how = "estimated" if energy["estimate"] else "measured"
    lines = [
        "## Environmental impact",
        "",
        f"- energy ({how}, {energy['method']}): {energy['kwh']:.6g} kWh at the devices",
        f"- emissions: {energy['co2_g']:.6g} g CO2eq ({energy['training_type']}; "
        f"PUE {energy['pue']:g}, grid {energy['grid_g_per_kwh']:g} g CO2eq/kWh, {energy['region']})",
        f"- source: {energy['source']}",
    ]
    if energy["estimate"]:
        lines.append("- this is an estimate, not a measurement: no energy counter could be read")
    if energy.get("note"):
        lines.append(f"- note: {energy['note']}")
    return [*lines, ""]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"

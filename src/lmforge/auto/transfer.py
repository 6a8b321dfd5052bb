"""muP transfer of a tuned config to a wider model (``lmforge sweep --transfer-width D``).

Under the maximal-update parametrisation (``model.mup: true``) the best learning rate, initialisation and
multipliers found at a small width stay the best at a larger one (Yang et al. 2022, Tensor Programs V). So
the sweep tunes at CONFIG's width and writes the same hyperparameters for width D: ``model.d_model = D``,
as many heads as keep the head dimension, the same query/key-value grouping, the feed-forward (and MoE
expert) widths scaled by D / d_model, and ``model.mup_base_width`` left at the width the hyperparameters were
tuned against (the tuned config's base, else its ``d_model``).
"""

from __future__ import annotations

from lmforge.auto.space import with_values
from lmforge.config import config_from_dict
from lmforge.errors import ConfigError

# Keys whose values the transfer itself sets: a sweep that searches them has no single width to start from.
SHAPE_KEYS = ("model.mup", "model.mup_base_width")


def transfer_config(data: dict, width: int) -> dict:
    """Plain config ``data`` of a model tuned under muP -> the same config at ``model.d_model = width``."""
    model = config_from_dict(data).model
    if not model.mup:
        raise ConfigError(
            "--transfer-width needs model.mup=true in the tuned config: only under muP do the tuned "
            "hyperparameters carry over to another width (set model.mup: true in CONFIG, or drop --transfer-width)"
        )
    if width < 1:
        raise ConfigError(f"--transfer-width={width} must be >= 1")
    head_dim = model.head_dim
    if width % head_dim:
        raise ConfigError(
            f"--transfer-width={width} is not a multiple of the head dimension {head_dim} (model.d_model="
            f"{model.d_model} / model.n_heads={model.n_heads}); choose a multiple of {head_dim}"
        )
    n_heads = width // head_dim
    values: dict = {
        "model.d_model": width,
        "model.n_heads": n_heads,
        "model.mup": True,
        "model.mup_base_width": model.mup_base_width or model.d_model,
    }
    if model.n_kv_heads is not None:
        group = model.n_heads // model.kv_heads  # query heads per key-value head, kept
        if n_heads % group:
            raise ConfigError(
                f"--transfer-width={width} gives {n_heads} heads, not a multiple of the {group} query heads "
                f"per key-value head (model.n_heads={model.n_heads}, model.n_kv_heads={model.n_kv_heads})"
            )
        values["model.n_kv_heads"] = n_heads // group
    scale = width / model.d_model
    if model.ffn_hidden is not None:  # None: derived from d_model by the model itself
        values["model.ffn_hidden"] = max(1, round(model.ffn_hidden * scale))
    for name in ("expert_hidden", "shared_expert_hidden"):
        if getattr(model.moe, name) is not None:
            values[f"model.moe.{name}"] = max(1, round(getattr(model.moe, name) * scale))
    out = with_values(data, values)
    config_from_dict(out)  # e.g. parallel.tp must still divide the new head count
    return out


def check_transfer(data: dict, width: int) -> None:
    """Fail before the sweep when ``width`` cannot be written for CONFIG."""
    transfer_config(data, width)

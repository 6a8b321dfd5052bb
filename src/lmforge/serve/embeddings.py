"""``/v1/embeddings``: a text's vector from the model's final-norm hidden states, L2-normalised.

Pooling "last" is the Transformer's own ``pool`` (the last real token's hidden state, what classification
fine-tuning reads: in a causal model it is the one position that has seen the whole text); "mean" averages
the hidden states of the real tokens. Inputs are right-padded into one batch: a causal model's real tokens
never attend to the padding after them, so a text's vector does not depend on its batch-mates.
"""

from __future__ import annotations

import torch

from lmforge.model.transformer import Transformer


def embed(model: Transformer, inputs: list[list[int]], pooling: str, device: torch.device) -> torch.Tensor:
    """The L2-normalised embeddings (B, C), float32 on the CPU, of token-id lists ``inputs``."""
    longest = max(len(ids) for ids in inputs)
    ids = torch.zeros(len(inputs), longest, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(inputs), longest, dtype=torch.bool)  # (B, T)
    for row, tokens in enumerate(inputs):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = True
    ids, mask = ids.to(device), mask.to(device)
    hidden = model.hidden_states(ids, attention_mask=mask).float()  # (B, T, C)
    if pooling == "last":
        pooled = Transformer.pool(hidden, mask)  # (B, C)
    else:
        weights = mask.float()[:, :, None]  # (B, T, 1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)  # (B, C)
    return torch.nn.functional.normalize(pooled, dim=-1).cpu()  # (B, C)

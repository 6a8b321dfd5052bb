"""Automatic prefix caching: the keys and values of prompt prefixes, kept so a later prompt that starts the
same way (a shared system prompt, an earlier turn of a chat) prefills only the rest.

Shape legend: L layers, Hkv key/value heads, N tokens, hd head dim.

A prompt is cut into blocks of ``BLOCK`` tokens (16, as vLLM's automatic prefix caching). A block is named by
a digest of every token up to its end (SHA-256 chained over the blocks), so it is reused only after exactly
the same prefix, and keys and values, which depend on every earlier token, are valid wherever the name
matches. Each block holds one tensor (L, 2, Hkv, BLOCK, hd): keys and values of its tokens in every layer.

Blocks live in an LRU order under a byte budget. A lookup or an insert touches a prompt's blocks from the
last to the first, so a block is always younger than the blocks that extend it: eviction takes the ends of
chains first and never strands a block behind a missing parent for long (an orphan is unreachable and ages
out). One thread (the scheduler's) uses a cache; it has no lock.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from dataclasses import dataclass

import torch

BLOCK = 16


@dataclass
class PrefixHit:
    """What a lookup found: ``tokens`` cached prompt tokens (a multiple of the block size) and their keys and
    values (L, 2, Hkv, tokens, hd), or None when nothing matched."""

    tokens: int
    kv: torch.Tensor | None


def block_names(tokens: list[int], n_blocks: int, block: int = BLOCK) -> list[bytes]:
    """The names of the first ``n_blocks`` full blocks of ``tokens``: block j's name digests blocks 0..j."""
    names, previous = [], b""
    for j in range(n_blocks):
        chunk = array("q", tokens[j * block : (j + 1) * block]).tobytes()
        previous = hashlib.sha256(previous + chunk).digest()
        names.append(previous)
    return names


class PrefixCache:
    """Blocks of prompt keys and values, LRU-evicted beyond ``budget_bytes`` (0: the cache keeps nothing)."""

    def __init__(self, budget_bytes: int, block: int = BLOCK):
        self.budget, self.block = budget_bytes, block
        self.blocks: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def cached_tokens(self, tokens: list[int], limit: int) -> int:
        """How many of the first ``limit`` tokens a lookup would find (the LRU order is left alone)."""
        found = 0
        for name in block_names(tokens, limit // self.block, self.block):
            if name not in self.blocks:
                break
            found += self.block
        return found

    def lookup(self, tokens: list[int], limit: int) -> PrefixHit:
        """The longest cached prefix of ``tokens`` within the first ``limit`` tokens, in whole blocks."""
        hits = []
        for name in block_names(tokens, limit // self.block, self.block):
            kv = self.blocks.get(name)
            if kv is None:
                break
            hits.append((name, kv))
        for name, _ in reversed(hits):  # the last block first: parents end up the most recently used
            self.blocks.move_to_end(name)
        if not hits:
            return PrefixHit(0, None)
        return PrefixHit(len(hits) * self.block, torch.cat([kv for _, kv in hits], dim=3))

    def insert(self, tokens: list[int], kv: torch.Tensor) -> None:
        """Keep the full blocks of ``tokens`` not yet cached, copied out of ``kv`` (L, 2, Hkv, N, hd): the keys
        and values of ``tokens`` (N = len(tokens)); then evict the least recently used down to the budget."""
        if self.budget <= 0:
            return
        names = block_names(tokens, len(tokens) // self.block, self.block)
        for j in reversed(range(len(names))):  # the last block first, as in lookup
            name = names[j]
            if name in self.blocks:
                self.blocks.move_to_end(name)
                continue
            block = kv[:, :, :, j * self.block : (j + 1) * self.block].clone()  # (L, 2, Hkv, BLOCK, hd)
            self.blocks[name] = block
            self.bytes += block.nbytes
        while self.bytes > self.budget and self.blocks:
            _, old = self.blocks.popitem(last=False)
            self.bytes -= old.nbytes

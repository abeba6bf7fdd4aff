"""Per-sequence KV caches under one token budget, in one paged pool.

K and V live in two tensors [layers, slots, kv_heads, head_dim] allocated once (zeroed: gathered padding must be
finite). A sequence owns whole blocks of `block_size` slots, reserved at admission for its prompt, its
max_new_tokens and one draft tree, so a step never allocates, never runs out mid-generation, and the sum of
reservations never exceeds the budget. A batched step gathers each sequence's slots through its block table.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


class AdmissionError(RuntimeError):
    """The request cannot be admitted now (`retryable`) or ever (too large for the whole budget)."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class SequenceCache:
    blocks: torch.Tensor  # [blocks] int64 on the pool's device: the sequence's block numbers, in position order
    block_size: int
    length: int = 0  # tokens whose K/V are committed
    last_used: float = field(default_factory=time.monotonic)

    @property
    def capacity(self) -> int:
        return self.blocks.numel() * self.block_size


class KVCachePool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, budget_tokens: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu", block_size: int = 16):
        self.block_size = block_size
        self.num_blocks = budget_tokens // block_size
        self.budget_tokens = self.num_blocks * block_size
        self.dtype, self.device = dtype, torch.device(device)
        # one slot more than the budget: `trash_slot`, where batched writes that must not land anywhere go
        self.trash_slot = self.budget_tokens
        shape = (num_layers, self.budget_tokens + 1, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=dtype, device=self.device)
        self.free_blocks = list(range(self.num_blocks - 1, -1, -1))
        self.sequences: dict[int, SequenceCache] = {}

    @property
    def reserved_tokens(self) -> int:
        return (self.num_blocks - len(self.free_blocks)) * self.block_size

    def admit(self, sequence_id: int, tokens: int) -> SequenceCache:
        if sequence_id in self.sequences:
            raise AdmissionError(f"sequence {sequence_id} is already active", retryable=False)
        blocks = -(-tokens // self.block_size)
        capacity = blocks * self.block_size
        if capacity > self.budget_tokens:
            raise AdmissionError(
                f"request needs {capacity} KV cache tokens (prompt + max_tokens + draft) but the whole budget is "
                f"{self.budget_tokens}; lower max_tokens or raise kv_cache_tokens", retryable=False)
        free = len(self.free_blocks) * self.block_size
        if capacity > free:
            raise AdmissionError(f"KV cache busy: request needs {capacity} tokens, {free} free", retryable=True)
        taken = [self.free_blocks.pop() for _ in range(blocks)]
        cache = SequenceCache(torch.tensor(taken, dtype=torch.long, device=self.device), self.block_size)
        self.sequences[sequence_id] = cache
        return cache

    def get(self, sequence_id: int) -> SequenceCache:
        cache = self.sequences.get(sequence_id)
        if cache is None:
            raise KeyError(f"sequence {sequence_id} is not active (finished, released or reclaimed)")
        cache.last_used = time.monotonic()
        return cache

    def release(self, sequence_id: int) -> bool:
        cache = self.sequences.pop(sequence_id, None)
        if cache is None:
            return False
        self.free_blocks += cache.blocks.tolist()
        return True

    def reclaim_idle(self, idle_seconds: float) -> list[int]:
        """Frees sequences untouched for idle_seconds (their client vanished without releasing)."""
        deadline = time.monotonic() - idle_seconds
        stale = [sid for sid, cache in self.sequences.items() if cache.last_used < deadline]
        for sid in stale:
            self.release(sid)
        return stale

    def contents(self, cache: SequenceCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The committed keys and values of one sequence, [layers, length, kv_heads, head_dim] each (inspection)."""
        slots = self.slots(cache.blocks[None], 0, torch.arange(cache.length, device=self.device))
        return self.keys[:, slots], self.values[:, slots]

    def block_table(self, caches: list[SequenceCache]) -> torch.Tensor:
        """[sequences, max blocks] block numbers, padded with block 0 (its slots are only ever masked out)."""
        return torch.nn.utils.rnn.pad_sequence([c.blocks for c in caches], batch_first=True)

    def slots(self, table: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pool slots of `positions` ([...] int64) in the sequences at `rows` of `table` (same shape or broadcast)."""
        return table[rows, positions // self.block_size] * self.block_size + positions % self.block_size

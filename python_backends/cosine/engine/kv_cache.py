"""Per-sequence KV caches under one token budget.

Each admitted sequence owns one contiguous buffer sized at admission for its prompt, its max_new_tokens and one
draft tree, so a step never reallocates or copies the prefix, and the sum of reservations never exceeds the budget.
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
    keys: torch.Tensor  # [layers, kv_heads, capacity, head_dim]
    values: torch.Tensor
    length: int = 0  # tokens whose K/V are committed
    last_used: float = field(default_factory=time.monotonic)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def keep_path(self, start: int, kept_offsets: list[int]) -> None:
        """Keep the tokens at start+offset (offsets increasing) as the tokens at start, start+1, ...; drop the rest.

        Used after tree verification: the accepted branch moves next to the prefix, rejected branches go."""
        for i, offset in enumerate(kept_offsets):
            if offset != i:
                self.keys[:, :, start + i] = self.keys[:, :, start + offset]
                self.values[:, :, start + i] = self.values[:, :, start + offset]
        self.length = start + len(kept_offsets)


class KVCachePool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, budget_tokens: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.budget_tokens = budget_tokens
        self.dtype, self.device = dtype, device
        self.sequences: dict[int, SequenceCache] = {}

    @property
    def reserved_tokens(self) -> int:
        return sum(seq.capacity for seq in self.sequences.values())

    def admit(self, sequence_id: int, capacity: int) -> SequenceCache:
        if sequence_id in self.sequences:
            raise AdmissionError(f"sequence {sequence_id} is already active", retryable=False)
        if capacity > self.budget_tokens:
            raise AdmissionError(
                f"request needs {capacity} KV cache tokens (prompt + max_tokens + draft) but the whole budget is "
                f"{self.budget_tokens}; lower max_tokens or raise kv_cache_tokens", retryable=False)
        free = self.budget_tokens - self.reserved_tokens
        if capacity > free:
            raise AdmissionError(f"KV cache busy: request needs {capacity} tokens, {free} free", retryable=True)
        layers, heads, dim = self.shape
        buffer = lambda: torch.empty(layers, heads, capacity, dim, dtype=self.dtype, device=self.device)  # noqa: E731
        seq = self.sequences[sequence_id] = SequenceCache(buffer(), buffer())
        return seq

    def get(self, sequence_id: int) -> SequenceCache:
        seq = self.sequences.get(sequence_id)
        if seq is None:
            raise KeyError(f"sequence {sequence_id} is not active (finished, released or reclaimed)")
        seq.last_used = time.monotonic()
        return seq

    def release(self, sequence_id: int) -> bool:
        return self.sequences.pop(sequence_id, None) is not None

    def reclaim_idle(self, idle_seconds: float) -> list[int]:
        """Frees sequences untouched for idle_seconds (their client vanished without releasing)."""
        deadline = time.monotonic() - idle_seconds
        stale = [sid for sid, seq in self.sequences.items() if seq.last_used < deadline]
        for sid in stale:
            del self.sequences[sid]
        return stale

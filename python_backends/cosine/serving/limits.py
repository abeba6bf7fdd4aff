"""Overload protection for one deployment: beyond its limits a request is refused at once (UNAVAILABLE, naming the
limit) rather than accepted and left to wait without bound; an accepted request runs to its end or fails with a
clear error, never silently truncated."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ServingError


@dataclass(frozen=True)
class Limits:
    # requests the `cosine` model serves at once, generating or waiting for the target's KV cache
    max_inflight_requests: int = 256
    # prompt + max_tokens, summed over the requests waiting for the target's KV cache
    max_queued_tokens: int = 262144
    # how long a request may wait for the target's KV cache before it fails
    queue_timeout_s: float = 60.0


class Overloaded(ServingError):
    def __init__(self, limit: str, value, situation: str):
        super().__init__(f"server busy: {situation} ({limit} = {value}); retry later", ServingError.UNAVAILABLE)
        self.limit = limit

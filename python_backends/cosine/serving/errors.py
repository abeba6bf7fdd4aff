"""Errors the serving loop raises; the Triton adapters map `kind` to a Triton error code."""
from __future__ import annotations


class ServingError(RuntimeError):
    INVALID = "invalid"  # the client's fault: HTTP 400 / gRPC INVALID_ARGUMENT
    UNAVAILABLE = "unavailable"  # try again later (e.g. the KV cache is full)
    INTERNAL = "internal"

    def __init__(self, message: str, kind: str = INTERNAL):
        super().__init__(message)
        self.kind = kind


class InvalidRequest(ServingError):
    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}", ServingError.INVALID)
        self.field = field_name

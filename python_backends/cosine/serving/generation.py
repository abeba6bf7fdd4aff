"""The generation loop of one request, written against small async interfaces (BLS in Triton, direct in tests).

Each round the target engine appends the pending token(s) and returns what it emits; text is detokenized
incrementally and released in chunks that never split a UTF-8 character or show part of a stop string."""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from ..speculation.tree import DraftTree
from .errors import InvalidRequest, ServingError
from .request import GenerationRequest
from .text import DetokenizerOffsets, StopStrings


class EngineClient(Protocol):
    async def step(self, sequence_id: int, input_ids: list[int], draft: DraftTree | None = None,
                   request: GenerationRequest | None = None) -> list[int]:
        """Appends input_ids (admitting the sequence when `request` is given), verifies `draft`, returns the
        emitted tokens."""

    async def release(self, sequence_id: int) -> None: ...


class TextClient(Protocol):
    async def encode(self, text: str) -> list[int]: ...

    async def decode(self, ids: list[int], read_offset: int, final: bool) -> tuple[str, bool]: ...


@dataclass
class Deployment:
    """What the loop needs to know about the deployment it runs in."""
    target: EngineClient
    text: TextClient
    max_context: int
    end_id: int | None
    admission_timeout_s: float = 120.0


@dataclass
class Stats:
    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finished: bool
    stats: Stats = field(default_factory=Stats)


def new_sequence_id() -> int:
    return uuid.uuid4().int >> 65  # 63 random bits: unique across the deployment's lifetime in practice


async def _admit(deployment: Deployment, sequence_id: int, prompt_ids: list[int], request: GenerationRequest):
    """First step of a sequence; waits while the engine's KV cache is full (admission control)."""
    deadline = time.monotonic() + deployment.admission_timeout_s
    delay = 0.01
    while True:
        try:
            return await deployment.target.step(sequence_id, prompt_ids, request=request)
        except ServingError as error:
            if error.kind != ServingError.UNAVAILABLE or time.monotonic() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


async def generate(request: GenerationRequest, deployment: Deployment) -> AsyncIterator[Chunk]:
    """Yields one Chunk per round (text may be empty); the last has finished=True. Closing it releases the KV cache."""
    prompt_ids = await deployment.text.encode(request.prompt)
    if len(prompt_ids) + request.max_tokens > deployment.max_context:
        raise InvalidRequest("max_tokens", f"the prompt is {len(prompt_ids)} tokens; with max_tokens "
                                           f"{request.max_tokens} it exceeds the model's context of "
                                           f"{deployment.max_context} tokens")
    end_id = deployment.end_id if request.end_id is None else request.end_id
    stops = StopStrings(request.stop_words)
    offsets = DetokenizerOffsets()
    generated: list[int] = []
    text, shown = "", 0
    prefix = "" if request.exclude_input_in_output else request.prompt
    stats = Stats()
    sequence_id = new_sequence_id()
    try:
        emitted = await _admit(deployment, sequence_id, prompt_ids, request)
        while True:
            stats.rounds += 1
            new_ids, finished = [], False
            for token in emitted:
                if token == end_id:
                    finished = True
                    break
                new_ids.append(token)
                if len(generated) + len(new_ids) == request.max_tokens:
                    finished = True
                    break
            generated += new_ids
            window, read_offset = offsets.window(generated)
            delta, advanced = await deployment.text.decode(window, read_offset, finished)
            if advanced:
                offsets.advance(len(generated))
            text += delta
            releasable, stopped = stops.releasable(text, finished)
            finished = finished or stopped
            yield Chunk(prefix + text[shown:releasable], new_ids, finished, stats)
            prefix, shown = "", releasable
            if finished:
                return
            emitted = await deployment.target.step(sequence_id, [generated[-1]])
    finally:
        await deployment.target.release(sequence_id)

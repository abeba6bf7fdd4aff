"""Parsing and validating a `cosine` request; every error names the input at fault."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine.sampling import InvalidParameter, SamplingParams
from .errors import InvalidRequest


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_tokens: int = 64
    stream: bool = False
    exclude_input_in_output: bool = False
    params: SamplingParams = SamplingParams()
    end_id: int | None = None
    stop_words: tuple[str, ...] = ()
    return_stats: bool = False
    min_length: int = 0  # end_id is not generated before this many tokens
    speculation_mode: str | None = None  # None: the deployment's default
    num_draft_tokens: int | None = None
    drafters: tuple[str, ...] = ()
    max_drafters: int | None = None  # cosine: None, the deployment's
    adaptive_draft_length: bool = True
    pipelined_drafting: bool = True
    classify_prompt: bool = True


def decode_utf8(field_name: str, value) -> str:
    raw = value if isinstance(value, bytes) else str(value).encode()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRequest(field_name, f"is not valid UTF-8 ({error.reason} at byte {error.start})") from None


def _scalar(inputs: dict, name: str, default, kind):
    array = inputs.get(name)
    if array is None:
        return default
    if array.size != 1:
        raise InvalidRequest(name, f"expected one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if kind is float:
        return float(value)
    if kind is bool:
        return bool(value)
    return int(value)


def parse_generation_request(inputs: dict[str, np.ndarray], default_max_tokens: int = 64) -> GenerationRequest:
    """inputs: the request's tensors by contract name, with their batch dimension."""
    for name, array in inputs.items():
        if array.ndim and array.shape[0] != 1:
            raise InvalidRequest(name, f"batch size must be 1 (one prompt per request), got {array.shape[0]}")
    if "text_input" not in inputs or inputs["text_input"].size != 1:
        raise InvalidRequest("text_input", "exactly one prompt string is required")
    prompt = decode_utf8("text_input", inputs["text_input"].reshape(-1)[0])
    if not prompt:
        raise InvalidRequest("text_input", "is empty")

    max_tokens = _scalar(inputs, "max_tokens", default_max_tokens, int)
    if max_tokens <= 0:
        raise InvalidRequest("max_tokens", f"must be > 0, got {max_tokens}")
    params = SamplingParams(
        temperature=_scalar(inputs, "temperature", 0.0, float),
        top_k=_scalar(inputs, "top_k", 0, int),
        top_p=_scalar(inputs, "top_p", 1.0, float),
        seed=_scalar(inputs, "random_seed", None, int),
    )
    try:
        params.validate()
    except InvalidParameter as error:
        raise InvalidRequest(error.field, error.reason) from None
    end_id = _scalar(inputs, "end_id", None, int)
    min_length = _scalar(inputs, "min_length", 0, int)
    if not 0 <= min_length <= max_tokens:
        raise InvalidRequest("min_length", f"must be in [0, max_tokens={max_tokens}], got {min_length}")
    max_drafters = _scalar(inputs, "max_drafters", None, int)
    if max_drafters is not None and max_drafters < 1:
        raise InvalidRequest("max_drafters", f"must be >= 1, got {max_drafters}")
    stop_words = tuple(decode_utf8("stop_words", word) for word in inputs.get("stop_words", np.empty(0)).reshape(-1))
    return GenerationRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        stream=_scalar(inputs, "stream", False, bool),
        exclude_input_in_output=_scalar(inputs, "exclude_input_in_output", False, bool),
        params=params,
        end_id=end_id,
        min_length=min_length,
        stop_words=stop_words,
        return_stats=_scalar(inputs, "return_stats", False, bool),
        speculation_mode=decode_utf8("speculation_mode", inputs["speculation_mode"].reshape(-1)[0])
        if "speculation_mode" in inputs else None,
        num_draft_tokens=_scalar(inputs, "num_draft_tokens", None, int),
        drafters=tuple(decode_utf8("drafters", name) for name in inputs.get("drafters", np.empty(0)).reshape(-1)),
        max_drafters=max_drafters,
        adaptive_draft_length=_scalar(inputs, "adaptive_draft_length", True, bool),
        pipelined_drafting=_scalar(inputs, "pipelined_drafting", True, bool),
        classify_prompt=_scalar(inputs, "classify_prompt", True, bool),
    )

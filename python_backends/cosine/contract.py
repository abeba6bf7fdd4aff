"""The tensor contract between every CoSine Triton model: names, dtypes, shapes.

This is the only place tensor names are spelled. config.pbtxt files are rendered from it, model.py adapters unpack
requests with it, and the BLS clients pack requests with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_TRITON_DTYPES = {
    "TYPE_BOOL": np.bool_,
    "TYPE_INT32": np.int32,
    "TYPE_UINT64": np.uint64,
    "TYPE_FP32": np.float32,
    "TYPE_STRING": np.object_,
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton config dtype, e.g. "TYPE_INT32"
    dims: tuple[int, ...] = (1,)
    optional: bool = False
    # Engine calls carry one sequence each with a different token count; Triton may still batch them.
    ragged: bool = False
    # one value per request that the model reads as a scalar (the tensorrtllm backend's `reshape: { shape: [ ] }`)
    scalar: bool = False

    @property
    def numpy_dtype(self):
        return _TRITON_DTYPES[self.dtype]

    def to_pbtxt(self, is_input: bool) -> str:
        parts = [f'name: "{self.name}"', f"data_type: {self.dtype}", f"dims: [ {', '.join(map(str, self.dims))} ]"]
        if is_input and self.optional:
            parts.append("optional: true")
        if is_input and self.ragged:
            parts.append("allow_ragged_batch: true")
        if self.scalar:
            parts.append("reshape: { shape: [ ] }")
        return "  { " + " ".join(parts) + " }"


@dataclass(frozen=True)
class ModelContract:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    input_by_name: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "input_by_name", {t.name: t for t in self.inputs})

    def pack(self, **values) -> list[tuple[str, np.ndarray]]:
        """Named values -> [(name, array with a leading batch dim of 1)], in the contract's dtypes.

        None values are skipped (optional inputs)."""
        packed = []
        for name, value in values.items():
            if value is None:
                continue
            spec = self.input_by_name[name]
            array = np.asarray(value, dtype=spec.numpy_dtype).reshape(1, -1)
            packed.append((name, array))
        return packed

    def pbtxt_io(self) -> str:
        ins = ",\n".join(t.to_pbtxt(True) for t in self.inputs)
        outs = ",\n".join(t.to_pbtxt(False) for t in self.outputs)
        return f"input [\n{ins}\n]\noutput [\n{outs}\n]\n"


# Prometheus metrics of the Python-backend models reach the metrics endpoint at most this long after the update (a
# thread per model process sends them; see triton/io.py:Metrics). Each changed metric costs a round trip to
# tritonserver that holds the process's GIL: at c64 the `cosine` process spent up to 140 ms a second in them at 0.05
METRICS_FLUSH_S = 0.1
# The metrics `cosine-client bench` reads besides serving them (model label: the engine model; mode and origin labels:
# the request's speculation mode and how its draft was made)
ENGINE_BUSY_SECONDS = "cosine_engine_busy_seconds_total"
ENGINE_BATCHES = "cosine_engine_batches_total"
ENGINE_BATCH_REQUESTS = "cosine_engine_batch_requests_total"
DRAFTS = "cosine_drafts_total"
AHEAD_DRAFTS_DROPPED = "cosine_ahead_drafts_dropped_total"

# Internal models (engines, router) act only on calls that carry the deployment's secret: every node of a deployment
# gets it through this environment variable (`cosine serve` generates one when it is unset). No config.pbtxt holds
# it, so the model-config API cannot reveal it.
DEPLOYMENT_SECRET_ENV = "COSINE_DEPLOYMENT_SECRET"
DEPLOYMENT_SECRET = "deployment_secret"
_DEPLOYMENT_SECRET_INPUT = TensorSpec(DEPLOYMENT_SECRET, "TYPE_STRING", (1,), optional=True)
# The target's engine model; its data-parallel replicas (deploy.spec.default_replicas) are TARGET_1, TARGET_2, ...
TARGET = "target"
# Drafter engine models are named with this prefix; the deployment serves without them (degraded) if it must.
DRAFTER_MODEL_PREFIX = "drafter_"
# The drafter trained on every domain: vanilla's drafter and the router's fallback unless a spec names another.
GENERAL_DRAFTER = "general"
# the values of `cosine`'s speculation_mode input
SPECULATION_MODES = ("autoregressive", "vanilla", "specinfer", "cosine")


def target_model_names(replicas: int) -> list[str]:
    """The Triton models of the target's replicas: TARGET, then TARGET_1, TARGET_2, ..."""
    return [TARGET] + [f"{TARGET}_{index}" for index in range(1, replicas)]


def engine_of(model: str) -> str:
    """The engine a Triton model serves: TARGET for each of its replicas, else the model itself."""
    name, _, index = model.rpartition("_")
    return TARGET if name == TARGET and index.isdigit() else model


def _scalar(name, dtype, optional=True):
    return TensorSpec(name, dtype, (1,), optional)


def _vector(name, dtype, optional=False, ragged=True):
    return TensorSpec(name, dtype, (-1,), optional, ragged)


# Top-level model: tensorrtllm_backend's interface, so its clients (and genai-perf) work unmodified.
COSINE = ModelContract(
    inputs=(
        TensorSpec("text_input", "TYPE_STRING", (1,)),
        _scalar("max_tokens", "TYPE_INT32"),
        _scalar("stream", "TYPE_BOOL"),
        _scalar("exclude_input_in_output", "TYPE_BOOL"),
        _scalar("temperature", "TYPE_FP32"),
        _scalar("top_k", "TYPE_INT32"),
        _scalar("top_p", "TYPE_FP32"),
        _scalar("random_seed", "TYPE_UINT64"),
        _scalar("end_id", "TYPE_INT32"),
        _scalar("pad_id", "TYPE_INT32"),
        _scalar("min_length", "TYPE_INT32"),  # end_id is not generated before this many tokens
        TensorSpec("stop_words", "TYPE_STRING", (-1,), optional=True),
        _scalar("return_stats", "TYPE_BOOL"),
        # CoSine's own: autoregressive | vanilla | specinfer | cosine (default: the deployment's)
        TensorSpec("speculation_mode", "TYPE_STRING", (1,), optional=True),
        _scalar("num_draft_tokens", "TYPE_INT32"),
        TensorSpec("drafters", "TYPE_STRING", (-1,), optional=True),
        # cosine's ablation switches: routed drafters that may cooperate (1: no fusion; default: the deployment's),
        # false to draft num_draft_tokens every round instead of the controller's choice, false to draft only
        # after each verification instead of during it, and false to have every drafter score the prompt instead of
        # the router classifying it from its tokens
        _scalar("max_drafters", "TYPE_INT32"),
        _scalar("adaptive_draft_length", "TYPE_BOOL"),
        _scalar("pipelined_drafting", "TYPE_BOOL"),
        _scalar("classify_prompt", "TYPE_BOOL"),
    ),
    outputs=(
        TensorSpec("text_output", "TYPE_STRING", (-1,)),
        TensorSpec("output_ids", "TYPE_INT32", (-1,)),
        TensorSpec("sequence_length", "TYPE_INT32", (1,)),
        # [rounds, draft tokens, accepted draft tokens] of this response's request so far (return_stats)
        TensorSpec("speculation_stats", "TYPE_INT32", (3,)),
        TensorSpec("routed_drafters", "TYPE_STRING", (-1,)),  # (return_stats) the drafters used, best first
    ),
)

PREPROCESSING = ModelContract(
    inputs=(TensorSpec("text", "TYPE_STRING", (1,), ragged=True),),
    outputs=(TensorSpec("input_ids", "TYPE_INT32", (-1,)),),
)

# Incremental detokenization: the caller sends the ids from its prefix offset on and where reading starts in them.
POSTPROCESSING = ModelContract(
    inputs=(
        _vector("token_ids", "TYPE_INT32"),
        TensorSpec("read_offset", "TYPE_INT32", (1,)),
        TensorSpec("final", "TYPE_BOOL", (1,)),
    ),
    outputs=(
        TensorSpec("text_delta", "TYPE_STRING", (1,)),
        # 1 when text_delta consumed the ids up to the end (the caller advances its offsets)
        TensorSpec("advanced", "TYPE_BOOL", (1,)),
    ),
)

# One batched step of n sequences on an engine (target or drafter). A sequence's first step admits it
# (max_new_tokens > 0: reserving KV cache for it, with its sampling parameters); later steps append tokens; `release`
# frees it. Each sequence succeeds or fails alone.
# The call packs everything into a few flat tensors, one per dtype, because every tensor costs its own trip through
# shared memory between three processes (measured on Triton 2.51, 2 idle cores: a BLS call with 2 tensors in and 2
# out 0.53 ms, with 24 and 24 1.37 ms; the step used to travel as 24 tensors in and 13 out). The header of each
# tensor sizes its ragged sections.
@dataclass(frozen=True)
class PackedTensor:
    """A flat tensor of the ENGINE contract: `fields` per sequence (the header, [n, fields] row-major), then the
    `sections` in this order, each every sequence's values in turn."""
    name: str
    fields: tuple[str, ...]
    sections: tuple[str, ...] = ()


STEP_KEYS = PackedTensor("step_keys", ("sequence_id", "random_seed"))
STEP_INTS = PackedTensor("step_ints", (
    "input_length",  # tokens fed (the input_ids section)
    "draft_length",  # nodes of the draft tree to verify (the draft_ids and draft_parents sections)
    "keep_length",  # drop cached tokens past this length first (a drafter rolls back to what was verified); -1: keep
    "extra_tokens",  # tokens to generate autoregressively after the step's own token (drafting k tokens: k - 1)
    "num_candidates",  # top candidates (id, untempered probability) to return for every emitted position (fusion)
    "score_input",  # 1: also return the mean log-probability of input_ids[1:] (a drafter scoring a prompt)
    "release",  # 1: free the sequence (everything else is ignored)
    "return_q",  # 1: a sampling drafter: return each emitted token's q
    "draft_q_vocab",  # the vocabulary size of the draft's q (0: no q, the draft is deterministic)
    # admission, read only where max_new_tokens > 0: the sequence's budget and sampling parameters; end_id (-1: none)
    # may not be emitted before min_length tokens follow the first step's input_ids
    "max_new_tokens", "top_k", "end_id", "min_length",
    # whole speculation rounds in this call (engine.Rounds), by the target's own drafter of this index (-1: none)
    "rounds_drafter", "rounds_draft_tokens", "rounds_count",
), (
    # each draft tree in topological order, and each node's parent within its own tree (-1: the last input token);
    # then the sparse q of sampled drafts (lossless acceptance needs the distribution each draft token was drawn from;
    # only its support travels, exactly sparse under top-k / top-p): per q row (per draft node of a sequence with a
    # q) its entries, and the entries' token ids; their values are step_reals' section
    "input_ids", "draft_ids", "draft_parents", "draft_q_counts", "draft_q_ids",
))
STEP_REALS = PackedTensor("step_reals", ("temperature", "top_p"), ("draft_q_probs",))
RESULT_INTS = PackedTensor("result_ints", (
    # emitted tokens: accepted draft tokens, then one token of the engine's own, then extra_tokens more
    "output_length",
    "q_rows",  # rows of the returned q (the emitted tokens, or 0) and their vocabulary size
    "q_vocab",
    "rounds",  # speculation rounds run in the call (the round_* sections)
), (
    # top_ids: [emitted, num_candidates] per sequence, the most likely tokens at each emitted position; the q of each
    # emitted token, sparse as the draft's; per round, its draft's length, how many of it were accepted and at how
    # many settled positions the drafter's top token was the emitted one (engine.RoundOutcome), then every round's
    # draft
    "output_ids", "top_ids", "output_q_counts", "output_q_ids", "round_drafted", "round_accepted", "round_matched",
    "round_draft_ids",
))
# output_probs: of each emitted token under the distribution it was drawn from; top_probs as top_ids
RESULT_REALS = PackedTensor("result_reals", (), ("output_probs", "top_probs", "input_logprob", "output_q_probs"))
RESULT_ERRORS = PackedTensor("result_errors", ("error_kind", "error_message"))  # kind "" (ok) or the ServingError's
ENGINE = ModelContract(
    inputs=(
        _vector(STEP_KEYS.name, "TYPE_UINT64"),
        _vector(STEP_INTS.name, "TYPE_INT32"),
        _vector(STEP_REALS.name, "TYPE_FP32"),
        _DEPLOYMENT_SECRET_INPUT,  # required in fact: a call without it is refused
    ),
    outputs=(
        TensorSpec(RESULT_INTS.name, "TYPE_INT32", (-1,)),
        TensorSpec(RESULT_REALS.name, "TYPE_FP32", (-1,)),
        TensorSpec(RESULT_ERRORS.name, "TYPE_STRING", (-1,)),
    ),
)

# The router: ranks the drafters a request may use (any subset of the deployment's, any order) from their prompt
# log-probabilities, or learns from feedback; drafters are named, never positional.
ROUTER = ModelContract(
    inputs=(
        _vector("drafter_names", "TYPE_STRING", optional=True),  # the candidates
        _vector("prompt_logprobs", "TYPE_FP32", optional=True),  # one per candidate, in the same order
        # the prompt's token ids: with prompt_logprobs, for the router's classifier to learn; without, to be routed
        # from them alone (an answer with cooperate 0: the candidates must score the prompt first)
        _vector("prompt_ids", "TYPE_INT32", optional=True),
        _scalar("max_drafters", "TYPE_INT32"),
        TensorSpec("feedback_context", "TYPE_STRING", (1,), optional=True),
        _vector("feedback_drafters", "TYPE_STRING", optional=True),
        _vector("feedback_matches", "TYPE_FP32", optional=True),  # per feedback drafter
        _vector("feedback_trials", "TYPE_FP32", optional=True),
        _DEPLOYMENT_SECRET_INPUT,  # required in fact: a call without it is refused
    ),
    outputs=(
        TensorSpec("ranking", "TYPE_STRING", (-1,)),
        TensorSpec("cooperate", "TYPE_INT32", (1,)),
        TensorSpec("context", "TYPE_STRING", (1,)),
        TensorSpec("acceptance", "TYPE_FP32", (1,)),  # the first choice's expected per-token acceptance
    ),
)


def _trtllm_scalar(name, dtype, optional=True):
    return TensorSpec(name, dtype, (1,), optional, scalar=True)


# The `tensorrt_llm` model of TensorRT-LLM's Triton backend (triton_backend/all_models/inflight_batcher_llm/
# tensorrt_llm/config.pbtxt): the inputs and outputs CoSine's adapter uses, with the template's names, dtypes and
# dims. One sequence per request (the backend takes batch > 1 only when decoupled); it keeps no state between
# requests. request_output_len: tokens to generate after input_ids, accepted draft tokens included.
# draft_input_ids: a chain of draft tokens verified by token match. The backend returns only requested outputs.
TENSORRT_LLM = ModelContract(
    inputs=(
        TensorSpec("input_ids", "TYPE_INT32", (-1,), optional=True, ragged=True),
        _trtllm_scalar("input_lengths", "TYPE_INT32", optional=False),
        _trtllm_scalar("request_output_len", "TYPE_INT32", optional=False),
        TensorSpec("draft_input_ids", "TYPE_INT32", (-1,), optional=True, ragged=True),
        _trtllm_scalar("end_id", "TYPE_INT32"),
        _trtllm_scalar("temperature", "TYPE_FP32"),
        _trtllm_scalar("runtime_top_k", "TYPE_INT32"),
        _trtllm_scalar("runtime_top_p", "TYPE_FP32"),
        _trtllm_scalar("min_tokens", "TYPE_INT32"),
        _trtllm_scalar("seed", "TYPE_UINT64"),
        _trtllm_scalar("return_context_logits", "TYPE_BOOL"),
        _trtllm_scalar("return_generation_logits", "TYPE_BOOL"),
        _trtllm_scalar("exclude_input_in_output", "TYPE_BOOL"),
    ),
    outputs=(
        TensorSpec("output_ids", "TYPE_INT32", (-1, -1)),  # [beams, tokens], padded with -1
        TensorSpec("sequence_length", "TYPE_INT32", (-1,)),  # [beams]
        TensorSpec("context_logits", "TYPE_FP32", (-1, -1)),  # [input tokens, vocab]
        TensorSpec("generation_logits", "TYPE_FP32", (-1, -1, -1)),  # [beams, generated tokens, vocab]
    ),
)

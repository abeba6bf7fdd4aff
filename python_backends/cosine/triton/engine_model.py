"""Triton adapter for an engine model (the target, or a drafter): batched stateful steps over the portable engine."""
from __future__ import annotations

import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from ..contract import ENGINE
from ..engine.checkpoint import load_causal_lm
from ..engine.engine import CausalLMEngine, StepError, StepRequest, Admission
from ..engine.kv_cache import AdmissionError
from ..engine.sampling import SamplingParams
from ..serving.errors import ServingError
from ..speculation.tree import DraftTree
from .io import Metrics, error_response, model_parameters, request_inputs, resolve_path, tensors


def _step_request(inputs: dict) -> StepRequest:
    values = {name: array.reshape(-1) for name, array in inputs.items()}

    def scalar(name, default=None, kind=int):
        return kind(values[name][0]) if name in values else default

    admission = None
    if "max_new_tokens" in values:
        params = SamplingParams(scalar("temperature", 0.0, float), scalar("top_k", 0), scalar("top_p", 1.0, float),
                                scalar("random_seed"))
        admission = Admission(scalar("max_new_tokens"), params, scalar("end_id"), scalar("min_length", 0))
    empty = np.empty(0, np.int32)
    draft = DraftTree(tuple(values.get("draft_ids", empty).tolist()),
                      tuple(values.get("draft_parents", empty).tolist()))
    return StepRequest(scalar("sequence_id"), values.get("input_ids", empty).tolist(), draft, admission,
                       keep_length=scalar("keep_length"), extra_tokens=scalar("extra_tokens", 0),
                       candidates=scalar("num_candidates", 0), score_input=scalar("score_input", False, bool))


class EngineModel:
    def initialize(self, args):
        params = model_parameters(args)
        threads = int(params.get("num_threads", "0"))
        if threads:
            torch.set_num_threads(threads)
        device = "cuda" if args["model_instance_kind"] == "GPU" and torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, params.get("dtype", "float32"))
        model = load_causal_lm(resolve_path(params["checkpoint_dir"], args), device, dtype)
        self.engine = CausalLMEngine(
            model,
            kv_cache_tokens=int(params["kv_cache_tokens"]),
            max_draft_tokens=int(params.get("max_draft_tokens", "64")),
            idle_timeout_s=float(params.get("idle_timeout_s", "600")),
        )
        labels = {"model": args["model_name"]}
        self.reserved_tokens = Metrics.metric(
            "cosine_kv_cache_reserved_tokens", "KV cache tokens reserved by active sequences", "GAUGE", **labels)
        self.active_sequences = Metrics.metric(
            "cosine_active_sequences", "Sequences holding KV cache in the engine", "GAUGE", **labels)
        self.batch_requests = Metrics.metric(
            "cosine_engine_batch_requests_total", "Sequence steps executed, summed over batches", **labels)
        self.batches = Metrics.metric("cosine_engine_batches_total", "Batched forward passes", **labels)
        self.batch_size = Metrics.metric("cosine_engine_batch_size", "Sequences per batched step", "HISTOGRAM",
                                         buckets=[1, 2, 4, 8, 16, 32, 64], **labels)
        # busy fraction = rate(cosine_engine_busy_seconds_total[1m]); target and drafters overlapping shows pipelining
        self.busy_seconds = Metrics.metric("cosine_engine_busy_seconds_total", "Seconds spent executing steps",
                                           **labels)

    def execute(self, requests):
        started = time.perf_counter()
        responses, steps, step_slots = [None] * len(requests), [], []
        for slot, request in enumerate(requests):
            inputs = request_inputs(request, ENGINE)
            try:
                if "release" in inputs and bool(inputs["release"].reshape(-1)[0]):
                    self.engine.release(int(inputs["sequence_id"].reshape(-1)[0]))
                    responses[slot] = pb_utils.InferenceResponse(tensors(
                        output_ids=np.empty(0, np.int32), output_probs=np.empty(0, np.float32),
                        top_ids=np.empty(0, np.int32), top_probs=np.empty(0, np.float32),
                        input_logprob=np.zeros(1, np.float32)))
                    continue
                steps.append(_step_request(inputs))
                step_slots.append(slot)
            except (KeyError, ValueError) as error:
                responses[slot] = error_response(ServingError(f"malformed engine request: {error}",
                                                              ServingError.INVALID))
        if steps:
            self.batches.increment(1)
            self.batch_requests.increment(len(steps))
            self.batch_size.observe(len(steps))
        for slot, result in zip(step_slots, self.engine.step(steps)):
            responses[slot] = self._response(result)
        self.reserved_tokens.set(self.engine.kv.reserved_tokens)
        self.active_sequences.set(self.engine.active_sequences)
        self.busy_seconds.increment(time.perf_counter() - started)
        return responses

    @staticmethod
    def _response(result):
        if isinstance(result, AdmissionError):
            kind = ServingError.UNAVAILABLE if result.retryable else ServingError.INVALID
            return error_response(ServingError(str(result), kind))
        if isinstance(result, StepError):
            return error_response(ServingError(str(result), ServingError.INVALID))
        if isinstance(result, Exception):
            return error_response(result)
        return pb_utils.InferenceResponse(tensors(
            output_ids=np.asarray(result.tokens, np.int32), output_probs=np.asarray(result.probs, np.float32),
            top_ids=np.asarray(result.top_ids, np.int32).reshape(-1),
            top_probs=np.asarray(result.top_probs, np.float32).reshape(-1),
            input_logprob=np.array([result.input_logprob], np.float32)))

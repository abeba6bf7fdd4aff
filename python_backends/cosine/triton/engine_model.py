"""Triton adapter for an engine model (the target, or a drafter): batched stateful steps over the portable engine."""
from __future__ import annotations

import torch
import triton_python_backend_utils as pb_utils

from ..contract import ENGINE, ENGINE_BATCH_REQUESTS, ENGINE_BATCHES, ENGINE_BUSY_SECONDS
from ..deploy.spec import engine_threads
from ..engine.checkpoint import load_causal_lm
from ..engine.engine import CausalLMEngine
from ..serving.errors import ServingError
from ..serving.lookahead import LookaheadEngine
from ..serving.trust import check_caller, deployment_secret
from ..serving.wire import pack_results, unpack_steps
from .io import Metrics, error_response, freeze_heap, model_parameters, request_inputs, resolve_path, tensors


CPU_LOOKAHEAD_SEQUENCES = 1  # calls a CPU target looks ahead: those decoding one sequence (see initialize)


class EngineModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.secret = deployment_secret()
        torch.set_num_threads(engine_threads(int(params["num_threads"]), int(params["replicas"])))
        device = "cuda" if args["model_instance_kind"] == "GPU" and torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, params["dtype"])
        model = load_causal_lm(resolve_path(params["checkpoint_dir"], args), device, dtype)
        engine = CausalLMEngine(
            model,
            kv_cache_tokens=int(params["kv_cache_tokens"]),
            max_draft_tokens=int(params.get("max_draft_tokens", "64")),
            idle_timeout_s=float(params.get("idle_timeout_s", "600")),
        )
        # On a CPU the look-ahead takes the processor that the hop it hides needs (the `cosine` process,
        # tritonserver): it pays only while other cores are idle, i.e. at low load (2 cores, 2 target replicas:
        # +22% plain decoding at c1, -8% at c32 where both replicas' calls hold 12-14 sequences). On a GPU the hop
        # leaves the device idle at any load (not measured: no Triton on the GPU machine). Drafters never look ahead.
        if params["lookahead"] != "1":
            max_sequences = 0
        else:
            max_sequences = None if device == "cuda" else CPU_LOOKAHEAD_SEQUENCES
        self.engine = LookaheadEngine(engine, max_sequences)
        labels = {"model": args["model_name"]}
        self.reserved_tokens = Metrics.metric(
            "cosine_kv_cache_reserved_tokens", "KV cache tokens reserved by active sequences", "GAUGE", **labels)
        self.active_sequences = Metrics.metric(
            "cosine_active_sequences", "Sequences holding KV cache in the engine", "GAUGE", **labels)
        self.batch_requests = Metrics.metric(
            ENGINE_BATCH_REQUESTS, "Sequence steps executed, summed over batches", **labels)
        self.batches = Metrics.metric(ENGINE_BATCHES, "Batched forward passes", **labels)
        self.batch_size = Metrics.metric("cosine_engine_batch_size", "Sequences per batched step", "HISTOGRAM",
                                         buckets=[1, 2, 4, 8, 16, 24, 32, 48, 64, 128], **labels)
        # busy fraction = rate(cosine_engine_busy_seconds_total[1m]); target and drafters overlapping shows pipelining
        self.busy_seconds = Metrics.metric(ENGINE_BUSY_SECONDS, "Seconds spent executing steps", **labels)
        self.looked_ahead = {outcome: Metrics.metric(
            "cosine_lookahead_steps_total", "Sequence steps of plain decoding computed ahead of their call, by "
            "whether the call took them or they were undone", outcome=outcome, **labels)
            for outcome in ("used", "undone")}
        self.counted = (0.0, 0, 0)  # the engine's busy seconds, steps used and undone, as last reported
        freeze_heap()

    def execute(self, requests):
        """Every sequence of every request (each a coalesced call from a `cosine` process) in one engine step."""
        responses, steps, sizes = [None] * len(requests), [], [0] * len(requests)
        for slot, request in enumerate(requests):
            inputs = request_inputs(request, ENGINE)
            try:
                check_caller(inputs, self.secret)
                unpacked = unpack_steps(inputs)
            except ServingError as error:
                responses[slot] = error_response(error)
                continue
            except (KeyError, ValueError) as error:
                responses[slot] = error_response(ServingError(f"malformed engine request: {error}",
                                                              ServingError.INVALID))
                continue
            steps += unpacked
            sizes[slot] = len(unpacked)
        stepping = [step for step in steps if not step.release]
        if stepping:
            self.batches.increment(1)
            self.batch_requests.increment(len(stepping))
            self.batch_size.observe(len(stepping))
        results = iter(self.engine.step(steps))  # in request order: each request takes its own sequences' results
        for slot, size in enumerate(sizes):
            if responses[slot] is None:
                responses[slot] = pb_utils.InferenceResponse(tensors(**pack_results(
                    [next(results) for _ in range(size)])))
        self.reserved_tokens.set(self.engine.engine.kv.reserved_tokens)
        self.active_sequences.set(self.engine.engine.active_sequences)
        # engine steps run on the look-ahead thread too: the engine times them all
        counts = (self.engine.busy_seconds, self.engine.used, self.engine.undone)
        busy, used, undone = (now - before for now, before in zip(counts, self.counted))
        self.counted = counts
        self.busy_seconds.increment(busy)
        self.looked_ahead["used"].increment(used)
        self.looked_ahead["undone"].increment(undone)
        return responses

    def finalize(self):
        self.engine.close()
        Metrics.close()

"""Triton adapter for an engine model (the target, or a drafter): batched stateful steps over the portable engine."""
from __future__ import annotations

from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils

from ..contract import ENGINE, ENGINE_BATCH_REQUESTS, ENGINE_BATCHES, ENGINE_BUSY_SECONDS
from ..deploy.repository import drafter_engine_parameters, read_list_parameter
from ..deploy.spec import engine_threads
from ..engine.checkpoint import load_causal_lm
from ..engine.engine import CausalLMEngine, StepRequest
from ..serving.errors import ServingError
from ..serving.lookahead import LookaheadEngine
from ..serving.rounds import RoundsEngine
from ..serving.trust import check_caller, deployment_secret
from ..serving.wire import pack_results, unpack_steps
from .io import Metrics, error_response, freeze_heap, model_parameters, request_inputs, resolve_path, tensors


CPU_LOOKAHEAD_SEQUENCES = 1  # calls a CPU target looks ahead: those decoding one sequence (see initialize)


def portable_engine(params: dict[str, str], checkpoint_dir: Path, device: str) -> CausalLMEngine:
    """The portable engine that an engine model's parameters describe (its own, or those the `cosine` model gets for
    a drafter in its process)."""
    model = load_causal_lm(checkpoint_dir, device, getattr(torch, params["dtype"]))
    return CausalLMEngine(model, kv_cache_tokens=int(params["kv_cache_tokens"]),
                          max_draft_tokens=int(params.get("max_draft_tokens", "64")),
                          idle_timeout_s=float(params.get("idle_timeout_s", "600")))


class EngineMetrics:
    """An engine's metrics, labelled with its model's name. with_histogram=False leaves out the batch-size histogram,
    whose every observation is a round trip holding the GIL (see io.Metrics): an engine in the `cosine` process
    (its mean batch size is still batch requests over batches)."""

    def __init__(self, model_name: str, with_histogram: bool = True):
        labels = {"model": model_name}
        self.reserved_tokens = Metrics.metric(
            "cosine_kv_cache_reserved_tokens", "KV cache tokens reserved by active sequences", "GAUGE", **labels)
        self.active_sequences = Metrics.metric(
            "cosine_active_sequences", "Sequences holding KV cache in the engine", "GAUGE", **labels)
        self.batch_requests = Metrics.metric(
            ENGINE_BATCH_REQUESTS, "Sequence steps executed, summed over batches", **labels)
        self.batches = Metrics.metric(ENGINE_BATCHES, "Batched forward passes", **labels)
        self.batch_size = Metrics.metric("cosine_engine_batch_size", "Sequences per batched step", "HISTOGRAM",
                                         buckets=[1, 2, 4, 8, 16, 24, 32, 48, 64, 128],
                                         **labels) if with_histogram else None
        # busy fraction = rate(cosine_engine_busy_seconds_total[1m]); target and drafters overlapping shows pipelining
        self.busy_seconds = Metrics.metric(ENGINE_BUSY_SECONDS, "Seconds spent executing steps", **labels)
        self.looked_ahead = {outcome: Metrics.metric(
            "cosine_lookahead_steps_total", "Sequence steps of plain decoding computed ahead of their call, by "
            "whether the call took them or they were undone", outcome=outcome, **labels)
            for outcome in ("used", "undone")}
        self.counted = (0.0, 0, 0)  # the engine's busy seconds, steps used and undone, as last reported

    def stepped(self, engine: LookaheadEngine, steps: list[StepRequest]) -> None:
        stepping = sum(not step.release for step in steps)
        if stepping:
            self.batches.increment(1)
            self.batch_requests.increment(stepping)
            if self.batch_size is not None:
                self.batch_size.observe(stepping)
        self.reserved_tokens.set(engine.engine.kv.reserved_tokens)
        self.active_sequences.set(engine.engine.active_sequences)
        # engine steps run on the look-ahead thread too: the engine times them all
        counts = (engine.busy_seconds, engine.used, engine.undone)
        busy, used, undone = (now - before for now, before in zip(counts, self.counted))
        self.counted = counts
        self.busy_seconds.increment(busy)
        self.looked_ahead["used"].increment(used)
        self.looked_ahead["undone"].increment(undone)


class EngineModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.secret = deployment_secret()
        torch.set_num_threads(engine_threads(int(params["num_threads"]), int(params["replicas"])))
        device = "cuda" if args["model_instance_kind"] == "GPU" and torch.cuda.is_available() else "cpu"
        engine = portable_engine(params, resolve_path(params["checkpoint_dir"], args), device)
        # On a CPU the look-ahead takes the processor that the hop it hides needs (the `cosine` process,
        # tritonserver): it pays only while other cores are idle, i.e. at low load (2 cores, 2 target replicas:
        # +22% plain decoding at c1, -8% at c32 where both replicas' calls hold 12-14 sequences). On a GPU the hop
        # leaves the device idle at any load (not measured: no Triton on the GPU machine). Drafters never look ahead.
        if params["lookahead"] != "1":
            max_sequences = 0
        else:
            max_sequences = None if device == "cuda" else CPU_LOOKAHEAD_SEQUENCES
        # a target with copies of the drafters runs speculation rounds in its process (deploy.spec.target_rounds)
        round_drafters = [portable_engine(engine_params, resolve_path(engine_params["checkpoint_dir"], args), device)
                          for engine_params in (drafter_engine_parameters(name, params)
                                                for name in read_list_parameter(params.get("round_drafters", "")))]
        self.engine = (RoundsEngine(engine, round_drafters, max_sequences) if round_drafters
                       else LookaheadEngine(engine, max_sequences))
        self.metrics = EngineMetrics(args["model_name"])
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
        results = iter(self.engine.step(steps))  # in request order: each request takes its own sequences' results
        for slot, size in enumerate(sizes):
            if responses[slot] is None:
                responses[slot] = pb_utils.InferenceResponse(tensors(**pack_results(
                    [next(results) for _ in range(size)])))
        self.metrics.stepped(self.engine, steps)
        return responses

    def finalize(self):
        self.engine.close()
        Metrics.close()

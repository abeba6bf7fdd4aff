"""Triton adapter for the top-level `cosine` model: decoupled, one coroutine per request; engines through BLS (drafters
on other nodes through gRPC), one call per engine per tick for all requests, every drafter behind a circuit breaker;
text encoded and detokenized in this process."""
from __future__ import annotations

import asyncio
import functools
from collections import Counter
from contextlib import aclosing

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

from ..contract import AHEAD_DRAFTS_DROPPED, COSINE, DRAFTS, ROUTER
from ..deploy.repository import drafter_engine_parameters, read_list_parameter, read_mapping_parameter
from ..deploy.spec import TRTLLM, drafter_model_name, engine_threads
from ..serving.batching import CoalescingEngine, InProcessEngine, ReplicatedEngine
from ..serving.errors import ServingError
from ..serving.generation import Deployment, RoundReport, generate
from ..serving.health import CircuitBreaker
from ..serving.limits import AdmissionGate, Limits
from ..serving.lookahead import LookaheadEngine
from ..serving.request import parse_generation_request
from ..serving.trtllm import TrtllmEngine
from ..serving.trust import deployment_secret
from ..speculation.control import LoadMonitor
from ..speculation.router import Route
from .engine_model import EngineMetrics, portable_engine
from .io import (Metrics, bls, engine_transport, error_response, freeze_heap, model_parameters, request_inputs,
                 resolve_path, tensors, trtllm_transport)
from .remote import GrpcEngineTransport

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class BlsRouter:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.secret = deployment_secret().encode()

    async def classify(self, prompt_ids: list[int], drafters: list[str], max_drafters: int) -> Route | None:
        route = await self._route(drafter_names=[name.encode() for name in drafters], prompt_ids=prompt_ids,
                                  max_drafters=max_drafters)
        return route if route.cooperate else None

    async def route(self, prompt_logprobs: dict[str, float], max_drafters: int, prompt_ids: list[int]) -> Route:
        return await self._route(drafter_names=[name.encode() for name in prompt_logprobs],
                                 prompt_logprobs=list(prompt_logprobs.values()), prompt_ids=prompt_ids,
                                 max_drafters=max_drafters)

    async def _route(self, **values) -> Route:
        out = await bls(self.model_name, ROUTER, ("ranking", "cooperate", "context", "acceptance"),
                        deployment_secret=[self.secret], **values)
        return Route(out["context"][0].decode(), [name.decode() for name in out["ranking"]],
                     int(out["cooperate"][0]), float(out["acceptance"][0]))

    async def feedback(self, context: str, matches: dict[str, float], trials: dict[str, float]) -> None:
        await bls(self.model_name, ROUTER, ("context",), deployment_secret=[self.secret],
                  feedback_context=[context.encode()],
                  feedback_drafters=[name.encode() for name in trials], feedback_matches=list(matches.values()),
                  feedback_trials=list(trials.values()))


def engine_client(model_name: str, kinds: dict[str, str], breaker: CircuitBreaker | None = None):
    """The engine interface to a local engine model, by its kind (the engine_kinds parameter; absent: portable)."""
    if kinds.get(model_name) == TRTLLM:
        return TrtllmEngine(model_name, trtllm_transport(model_name), breaker)
    return CoalescingEngine(model_name, engine_transport(model_name), breaker)


def target_client(model_names: list[str], kinds: dict[str, str]):
    """The target: its data-parallel replicas (one engine model each), one or several."""
    return ReplicatedEngine([engine_client(name, kinds) for name in model_names])


class CosineModel:
    def initialize(self, args):
        params = model_parameters(args)
        drafters = read_list_parameter(params["drafters"])
        kinds = read_mapping_parameter(params.get("engine_kinds", ""))
        in_process_params = {name: drafter_engine_parameters(name, params)
                             for name in read_list_parameter(params.get("in_process_drafters", ""))}
        if in_process_params:  # torch's threads are process-wide: the drafters' steps share them with acceptance's
            torch.set_num_threads(max(engine_threads(int(engine["num_threads"]))
                                      for engine in in_process_params.values()))
        in_process = {name: self._in_process_engine(name, engine, args) for name, engine in in_process_params.items()}
        tokenizer = AutoTokenizer.from_pretrained(str(resolve_path(params["tokenizer_dir"], args)),
                                                  local_files_only=True)
        remote = read_mapping_parameter(params.get("remote_drafters", ""))
        in_flight = Metrics.metric("cosine_inflight_requests", "Requests inside the cosine model (generating or "
                                        "waiting for the target's KV cache)", "GAUGE")
        def speculating(drafters: tuple[str, ...], allowed: bool) -> None:
            Metrics.metric("cosine_speculation_allowed", "1 while adaptive cosine requests drafting from these "
                           "drafters may draft, 0 while speculation is measured not to pay them at this load",
                           "GAUGE", drafters="+".join(drafters)).set(int(allowed))
        def measured(drafters: tuple[str, ...], allowed: bool, bucket: int, rate: float) -> None:
            labels = dict(drafters="+".join(drafters), load=str(2 ** bucket), speculating=str(allowed).lower())
            Metrics.metric("cosine_speculation_windows_total", "Speculation windows measured, by the drafters of the "
                           "adaptive requests, the load (active requests, powers of two) and whether they could "
                           "draft", **labels).increment(1)
            Metrics.metric("cosine_speculation_window_tokens_per_second", "Output tokens per busy second that "
                           "the speculation windows measured (smoothed), by the same labels", "GAUGE",
                           **labels).set(rate)
        monitor = LoadMonitor(on_speculation_change=speculating, on_window_measured=measured)
        routed = tuple(sorted(drafters))  # requests that name no drafters
        speculating(routed, monitor.windows(routed).allowed)
        self.deployment = Deployment(
            target=target_client(read_list_parameter(params["target_model"]), kinds),
            tokenizer=tokenizer,
            max_context=int(params["max_context_tokens"]),
            # empty: the repository was written without the checkpoint at hand; the tokenizer knows its EOS
            end_id=int(params["end_id"]) if params.get("end_id") else tokenizer.eos_token_id,
            drafters={name: self._drafter(name, remote.get(name), in_process.get(name), params, kinds)
                      for name in drafters},
            general_drafter=params.get("general_drafter") or None,
            router=BlsRouter(params["router_model"]) if params.get("router_model") else None,
            max_cooperating_drafters=int(params.get("max_cooperating_drafters", "2")),
            default_mode=params["speculation_mode"],
            default_draft_tokens=int(params["num_draft_tokens"]),
            adaptive_draft_tokens=int(params["adaptive_draft_tokens"]),
            plain_decode_steps=int(params["plain_decode_steps"]),
            plain_decode_steps_alone=int(params["plain_decode_steps_alone"]),
            target_rounds=int(params.get("target_rounds", "0")),
            round_drafters=tuple(read_list_parameter(params.get("round_drafters", ""))),
            max_draft_tokens=int(params["max_draft_tokens"]),
            on_round=self._count_round,
            # max_queued_requests is Triton's queue policy (the repository writes it), not this model's business
            gate=AdmissionGate(Limits(max_inflight_requests=int(params["max_inflight_requests"]),
                                      max_queued_tokens=int(params["max_queued_tokens"]),
                                      queue_timeout_s=float(params["queue_timeout_s"])), on_change=in_flight.set),
            on_admitted=lambda queued_s: self.queue_seconds.observe(queued_s),
            monitor=monitor,
        )
        self.default_max_tokens = int(params.get("default_max_tokens", "64"))
        self.requests = {status: Metrics.metric("cosine_requests_total", "Finished requests by status", status=status)
                         for status in ("success", "invalid", "cancelled", "error")}
        self.queue_seconds = Metrics.metric("cosine_queue_seconds", "Seconds a request waited for the target's KV "
                                            "cache before its first step", "HISTOGRAM",
                                            buckets=[0, 0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120])
        self.output_tokens = Metrics.metric("cosine_output_tokens_total", "Tokens generated")
        freeze_heap()

    @staticmethod
    def _in_process_engine(name: str, engine_params: dict[str, str], args) -> tuple[LookaheadEngine, EngineMetrics]:
        """A drafter's engine in this process."""
        engine = portable_engine(engine_params, resolve_path(engine_params["checkpoint_dir"], args), "cpu")
        return LookaheadEngine(engine, max_sequences=0), EngineMetrics(drafter_model_name(name), with_histogram=False)

    @staticmethod
    def _drafter(name: str, url: str | None, in_process: tuple[LookaheadEngine, EngineMetrics] | None,
                 params: dict, kinds: dict[str, str]):
        """A drafter engine in this server (BLS, either kind), in this process, or on another node (gRPC), behind its
        circuit breaker."""
        model = drafter_model_name(name)
        up = Metrics.metric("cosine_drafter_up", "1 while the drafter takes calls, 0 while it is routed around",
                            "GAUGE", drafter=name)
        failures = Metrics.metric("cosine_drafter_failures_total", "Drafter calls that failed or timed out",
                                  drafter=name)
        up.set(1)
        breaker = CircuitBreaker(model if url is None else f"{model} at {url}", float(params["drafter_timeout_s"]),
                                 float(params["drafter_probe_after_s"]), on_change=lambda is_up: up.set(int(is_up)),
                                 on_failure=lambda: failures.increment(1))
        if in_process is not None:
            engine, metrics = in_process
            return InProcessEngine(model, engine, breaker, on_step=functools.partial(metrics.stepped, engine))
        if url is None:
            return engine_client(model, kinds, breaker)
        return CoalescingEngine(model, GrpcEngineTransport(url, model), breaker)

    def _count_round(self, report: RoundReport) -> None:
        """Rounds per mode and draft depth; drafts by origin; per drafter: rounds, drafted and accepted tokens,
        acceptance by position. Counters only: a histogram takes a round trip to tritonserver per observation, which
        holds the GIL (see triton/io.py:Metrics), and rounds come hundreds a second under load."""
        depths = report.draft.tree.depths() if report.draft else []
        self._round_metric("cosine_rounds_total", "Rounds by draft depth (0: plain decoding)", None, mode=report.mode,
                           draft_depth=str(max(depths, default=0))).increment(1)
        if report.draft is None:
            return
        self._round_metric(DRAFTS, "Drafts by how they were made: alone, ahead (pipelined), fused, merged, "
                           "target (the target's own rounds)", None, mode=report.mode,
                           origin=report.draft.origin.value).increment(1)
        if report.draft.dropped_ahead:
            self._round_metric(AHEAD_DRAFTS_DROPPED, "Drafts made ahead (pipelined) that assumed a "
                               "context the target did not emit", None, mode=report.mode).increment(1)
        sources = report.draft.sources
        for drafter, count in Counter(sources).items():
            self._round_metric("cosine_draft_tokens_total", "Draft tokens proposed", drafter).increment(count)
            self._round_metric("cosine_speculation_rounds_total", "Verification rounds a drafter took part in",
                               drafter).increment(1)
        for drafter, count in Counter(sources[node] for node in report.accepted).items():
            self._round_metric("cosine_accepted_tokens_total", "Draft tokens accepted", drafter).increment(count)
        for node in report.accepted:  # a path: one node per depth
            self._round_metric("cosine_accepted_at_position_total", "Draft tokens accepted by depth in the draft",
                               sources[node], position=str(depths[node])).increment(1)

    @staticmethod
    def _round_metric(name, description, drafter, **labels):
        if drafter is not None:
            labels["drafter"] = drafter
        return Metrics.metric(name, description, **labels)

    def execute(self, requests):
        """Returns at once while the deployment has room (the backend runs the returned coroutine in the background,
        as for an async execute); at its limits it blocks, so new requests wait in Triton's queue, which refuses them
        with 503 beyond max_queued_requests. Requests of this batch beyond the room wait here, within the queue
        timeout (at most max_batch_size - 1 of them)."""
        admitted = self.deployment.gate.enter(len(requests))
        return self._serve_all(requests[:admitted], requests[admitted:])

    async def _serve_all(self, admitted, beyond):
        await asyncio.gather(*(self._serve(request) for request in admitted),
                             *(self._serve_when_admitted(request) for request in beyond))

    async def _serve_when_admitted(self, request):
        if await self.deployment.gate.enter_later():
            await self._serve(request)
            return
        timeout_s = self.deployment.gate.limits.queue_timeout_s
        request.get_response_sender().send(error_response(ServingError(
            f"waited {timeout_s:g} s for room in the deployment (queue_timeout_s = {timeout_s:g})",
            ServingError.UNAVAILABLE)), flags=FINAL)
        self.requests["error"].increment(1)

    async def _serve(self, request):
        """Serves an admitted request; it leaves the gate at its end."""
        sender = request.get_response_sender()
        try:
            status = await self._generate(request, sender)
        except ServingError as error:
            sender.send(error_response(error), flags=FINAL)
            status = "invalid" if error.kind == ServingError.INVALID else "error"
        except Exception as error:  # a bug must fail this request, not the model
            sender.send(error_response(ServingError(f"internal error: {error!r}")), flags=FINAL)
            status = "error"
        finally:
            self.deployment.gate.leave()
        self.requests[status].increment(1)

    async def _generate(self, request, sender) -> str:
        generation = parse_generation_request(request_inputs(request, COSINE), self.default_max_tokens)
        texts, ids = [], []  # non-streaming: everything; streaming: ids not yet sent with text
        async with aclosing(generate(generation, self.deployment)) as chunks:
            async for chunk in chunks:
                self.output_tokens.increment(len(chunk.token_ids))
                if sender.is_cancelled():
                    sender.send(error_response(ServingError("request cancelled")), flags=FINAL)
                    return "cancelled"
                texts.append(chunk.text)
                ids += chunk.token_ids
                if generation.stream and chunk.text and not chunk.finished:
                    sender.send(self._response(generation, "".join(texts), ids, chunk.stats))
                    texts, ids = [], []
                elif chunk.finished:
                    if "".join(texts) or ids or not generation.stream:
                        sender.send(self._response(generation, "".join(texts), ids, chunk.stats), flags=FINAL)
                    else:
                        sender.send(flags=FINAL)
        return "success"

    @staticmethod
    def _response(generation, text, ids, stats):
        outputs = dict(text_output=np.array([text.encode()], np.object_), output_ids=np.asarray(ids, np.int32),
                       sequence_length=np.array([len(ids)], np.int32))
        if generation.return_stats:
            outputs["speculation_stats"] = np.array([stats.rounds, stats.draft_tokens, stats.accepted_tokens],
                                                    np.int32)
            outputs["routed_drafters"] = np.array([name.encode() for name in stats.drafters] or [b""], np.object_)
        return pb_utils.InferenceResponse(tensors(**outputs))

    def finalize(self):
        for drafter in self.deployment.drafters.values():
            if isinstance(drafter, InProcessEngine):
                drafter.engine.close()
        Metrics.close()

"""Triton adapter for the top-level `cosine` model: decoupled, one coroutine per request, engines through BLS."""
from __future__ import annotations

import asyncio
from contextlib import aclosing

import numpy as np
import triton_python_backend_utils as pb_utils

from ..contract import COSINE, ENGINE, POSTPROCESSING, PREPROCESSING, ROUTER
from ..deploy.repository import drafter_model_name
from ..engine.engine import StepResult
from ..serving.errors import ServingError
from ..serving.generation import Deployment, RoundReport, generate
from ..serving.request import GenerationRequest, parse_generation_request
from ..speculation.router import Route
from .io import Metrics, bls, error_response, model_parameters, request_inputs, tensors

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class BlsEngine:
    """An engine model (target or drafter) called through BLS."""

    OUTPUTS = ("output_ids", "output_probs", "top_ids", "top_probs", "input_logprob")

    def __init__(self, model_name: str):
        self.model_name = model_name

    async def step(self, sequence_id, input_ids, draft=None, *, request: GenerationRequest | None = None,
                   keep_length=None, extra_tokens=0, candidates=0, score_input=False) -> StepResult:
        values = dict(sequence_id=sequence_id, input_ids=input_ids, keep_length=keep_length,
                      extra_tokens=extra_tokens or None, num_candidates=candidates or None,
                      score_input=score_input or None)
        if request is not None:
            params = request.params
            values.update(max_new_tokens=request.max_tokens, temperature=params.temperature, top_k=params.top_k,
                          top_p=params.top_p, random_seed=params.seed, min_length=request.min_length or None,
                          end_id=request.end_id if request.min_length else None)
        if draft:
            values.update(draft_ids=draft.tokens, draft_parents=draft.parents)
        out = await bls(self.model_name, ENGINE, self.OUTPUTS, **values)
        tokens = out["output_ids"].tolist()
        return StepResult(tokens, out["output_probs"].tolist(), out["top_ids"].reshape(len(tokens), -1).tolist(),
                          out["top_probs"].reshape(len(tokens), -1).tolist(), float(out["input_logprob"][0]))

    async def release(self, sequence_id):
        await bls(self.model_name, ENGINE, ("output_ids",), sequence_id=sequence_id, release=True)


class BlsRouter:
    def __init__(self, model_name: str):
        self.model_name = model_name

    async def route(self, prompt_logprobs, max_drafters) -> Route:
        out = await bls(self.model_name, ROUTER, ("ranking", "cooperate", "context", "acceptance"),
                        prompt_logprobs=prompt_logprobs, max_drafters=max_drafters)
        return Route(int(out["context"][0]), out["ranking"].tolist(), int(out["cooperate"][0]),
                     float(out["acceptance"][0]))

    async def feedback(self, context, matches, trials) -> None:
        await bls(self.model_name, ROUTER, ("context",), feedback_context=context, feedback_matches=matches,
                  feedback_trials=trials)


class BlsText:
    def __init__(self, preprocessing: str, postprocessing: str):
        self.preprocessing, self.postprocessing = preprocessing, postprocessing

    async def encode(self, text):
        out = await bls(self.preprocessing, PREPROCESSING, ("input_ids",), text=text.encode())
        return out["input_ids"].tolist()

    async def decode(self, ids, read_offset, final):
        out = await bls(self.postprocessing, POSTPROCESSING, ("text_delta", "advanced"),
                        token_ids=ids, read_offset=read_offset, final=final)
        return out["text_delta"][0].decode(), bool(out["advanced"][0])


class CosineModel:
    def initialize(self, args):
        params = model_parameters(args)
        drafters = [name for name in params["drafters"].split(",") if name]
        self.deployment = Deployment(
            target=BlsEngine(params["target_model"]),
            text=BlsText(params["preprocessing_model"], params["postprocessing_model"]),
            max_context=int(params["max_context_tokens"]),
            end_id=int(params["end_id"]) if params.get("end_id") else None,
            drafters={name: BlsEngine(drafter_model_name(name)) for name in drafters},
            general_drafter=params.get("general_drafter") or None,
            router=BlsRouter(params["router_model"]) if params.get("router_model") else None,
            max_cooperating_drafters=int(params.get("max_cooperating_drafters", "2")),
            default_mode=params["speculation_mode"],
            default_draft_tokens=int(params["num_draft_tokens"]),
            adaptive_draft_tokens=int(params["adaptive_draft_tokens"]),
            max_draft_tokens=int(params["max_draft_tokens"]),
            on_round=self._count_round,
        )
        self.default_max_tokens = int(params.get("default_max_tokens", "64"))
        self.requests = {status: Metrics.metric("cosine_requests_total", "Finished requests by status", status=status)
                         for status in ("success", "invalid", "cancelled", "error")}
        self.output_tokens = Metrics.metric("cosine_output_tokens_total", "Tokens generated")
        self.round_metrics = {}

    def _count_round(self, report: RoundReport) -> None:
        """Draft length per mode; per drafter: rounds, drafted and accepted tokens, acceptance by position."""
        depths = report.draft.tree.depths() if report.draft else []
        self._round_metric("cosine_draft_length", "Draft depth per round (0: plain decoding)", None,
                           mode=report.mode).observe(max(depths, default=0))
        if report.draft is None:
            return
        for drafter in report.draft.sources:
            self._round_metric("cosine_draft_tokens_total", "Draft tokens proposed", drafter).increment(1)
        for node in report.accepted:
            drafter = report.draft.sources[node]
            self._round_metric("cosine_accepted_tokens_total", "Draft tokens accepted", drafter).increment(1)
            self._round_metric("cosine_accepted_at_position_total", "Draft tokens accepted by depth in the draft",
                               drafter, position=str(depths[node])).increment(1)
        for drafter in set(report.draft.sources):
            self._round_metric("cosine_speculation_rounds_total", "Verification rounds a drafter took part in",
                               drafter).increment(1)

    def _round_metric(self, name, description, drafter, **labels):
        if drafter is not None:
            labels["drafter"] = drafter
        key = (name, tuple(labels.items()))
        if key not in self.round_metrics:
            histogram = name == "cosine_draft_length"
            self.round_metrics[key] = Metrics.metric(name, description, "HISTOGRAM" if histogram else "COUNTER",
                                                     buckets=[0, 1, 2, 3, 4, 6, 8, 12, 16] if histogram else None,
                                                     **labels)
        return self.round_metrics[key]

    async def execute(self, requests):
        await asyncio.gather(*(self._serve(request) for request in requests))

    async def _serve(self, request):
        sender = request.get_response_sender()
        try:
            status = await self._generate(request, sender)
        except ServingError as error:
            sender.send(error_response(error), flags=FINAL)
            status = "invalid" if error.kind == ServingError.INVALID else "error"
        except Exception as error:  # a bug must fail this request, not the model
            sender.send(error_response(ServingError(f"internal error: {error!r}")), flags=FINAL)
            status = "error"
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

"""Triton adapter for the top-level `cosine` model: decoupled, one coroutine per request, engines through BLS."""
from __future__ import annotations

import asyncio
from contextlib import aclosing

import numpy as np
import triton_python_backend_utils as pb_utils

from ..contract import COSINE, ENGINE, POSTPROCESSING, PREPROCESSING
from ..serving.errors import ServingError
from ..serving.generation import Deployment, generate
from ..serving.request import GenerationRequest, parse_generation_request
from .io import Metrics, bls, error_response, model_parameters, request_inputs, tensors

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class BlsEngine:
    def __init__(self, model_name: str):
        self.model_name = model_name

    async def step(self, sequence_id, input_ids, draft=None, request: GenerationRequest | None = None):
        admission = {}
        if request is not None:
            params = request.params
            admission = dict(max_new_tokens=request.max_tokens, temperature=params.temperature, top_k=params.top_k,
                             top_p=params.top_p, random_seed=params.seed)
        tree = {} if not draft else dict(draft_ids=draft.tokens, draft_parents=draft.parents)
        out = await bls(self.model_name, ENGINE, ("output_ids",), sequence_id=sequence_id, input_ids=input_ids,
                        **tree, **admission)
        return out["output_ids"].tolist()

    async def release(self, sequence_id):
        await bls(self.model_name, ENGINE, ("output_ids",), sequence_id=sequence_id, release=True)


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
        self.deployment = Deployment(
            target=BlsEngine(params["target_model"]),
            text=BlsText(params["preprocessing_model"], params["postprocessing_model"]),
            max_context=int(params["max_context_tokens"]),
            end_id=int(params["end_id"]) if params.get("end_id") else None,
        )
        self.default_max_tokens = int(params.get("default_max_tokens", "64"))
        self.requests = {status: Metrics.metric("cosine_requests_total", "Finished requests by status", status=status)
                         for status in ("success", "invalid", "cancelled", "error")}
        self.output_tokens = Metrics.metric("cosine_output_tokens_total", "Tokens generated")

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
        return pb_utils.InferenceResponse(tensors(**outputs))

"""Triton adapter for the router: one process holds the learned routing state for the whole deployment."""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from ..contract import ROUTER
from ..serving.errors import ServingError
from ..speculation.router import Route, Router
from .io import Metrics, error_response, model_parameters, request_inputs, tensors


class RouterModel:
    def initialize(self, args):
        self.drafters = [name for name in model_parameters(args)["drafters"].split(",") if name]
        self.router = Router(len(self.drafters))
        self.routed = {name: Metrics.metric("cosine_router_requests_total", "Requests routed to a drafter (first "
                                            "choice)", drafter=name) for name in self.drafters}

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = {name: array.reshape(-1) for name, array in request_inputs(request, ROUTER).items()}
            try:
                responses.append(self._answer(inputs))
            except ValueError as error:
                responses.append(error_response(ServingError(str(error), ServingError.INVALID)))
        return responses

    def _answer(self, inputs):
        if "feedback_context" in inputs:
            for drafter, (matches, trials) in enumerate(zip(inputs["feedback_matches"], inputs["feedback_trials"])):
                if trials > 0:
                    self.router.feedback(int(inputs["feedback_context"][0]), drafter, float(matches), float(trials))
            route = Route(int(inputs["feedback_context"][0]), [], 0, 0.0)
        else:
            max_drafters = int(inputs["max_drafters"][0]) if "max_drafters" in inputs else 1
            route = self.router.route(inputs["prompt_logprobs"].astype(float).tolist(), max_drafters)
            self.routed[self.drafters[route.ranking[0]]].increment(1)
        return pb_utils.InferenceResponse(tensors(ranking=np.asarray(route.ranking, np.int32),
                                                  cooperate=np.array([route.cooperate], np.int32),
                                                  context=np.array([route.context], np.int32),
                                                  acceptance=np.array([route.acceptance], np.float32)))

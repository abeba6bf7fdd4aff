"""Triton adapter for the router: one process holds the learned routing state for the whole deployment."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ..contract import ROUTER
from ..deploy.repository import read_list_parameter
from ..launcher import process_stat
from ..serving.errors import ServingError
from ..serving.trust import check_caller, deployment_secret
from ..speculation.router import Route, Router
from .io import Metrics, error_response, freeze_heap, model_parameters, request_inputs, tensors


log = logging.getLogger(__name__)


def state_file(model_name: str) -> Path:
    """Where the router keeps what it learned while its server lives: the watchdog restores a router whose process
    died in the same server, and the new process takes it back. Keyed by the server process (pid and start time, so
    a recycled pid is not mistaken for it): a new server starts fresh."""
    server = os.getppid()
    started = process_stat(server)[19]  # field 22, starttime
    return Path(tempfile.gettempdir()) / f"cosine-{model_name}-{server}-{started}.json"


# what decided a route (the `by` label of cosine_router_routes_total)
BY_SCORES, BY_CLASSIFIER = "likelihood", "prompt_classifier"


def _names(array) -> list[str]:
    return [name.decode() if isinstance(name, bytes) else str(name) for name in array]


def _strings(names) -> np.ndarray:
    return np.array([name.encode() for name in names], np.object_)


class RouterModel:
    def initialize(self, args):
        self.drafters = read_list_parameter(model_parameters(args)["drafters"])
        self.secret = deployment_secret()
        self.router = Router(self.drafters)
        self.state_file = state_file(args["model_name"])
        try:
            self.router.restore(json.loads(self.state_file.read_text()))
            log.warning("router: took back what it learned from %s", self.state_file)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError) as error:  # a torn or foreign file: start afresh
            log.warning("router: ignoring %s: %s", self.state_file, error)
        self.routed = {name: Metrics.metric("cosine_router_requests_total", "Requests routed to a drafter (first "
                                            "choice)", drafter=name) for name in self.drafters}
        self.routed_by = {by: Metrics.metric("cosine_router_routes_total", "Requests routed, by what decided: the "
                                             "drafters' scores of the prompt (likelihood) or the classifier learnt "
                                             "from them (prompt_classifier)", by=by)
                          for by in (BY_SCORES, BY_CLASSIFIER)}
        freeze_heap()

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = {name: array.reshape(-1) for name, array in request_inputs(request, ROUTER).items()}
            try:
                check_caller(inputs, self.secret)
                responses.append(self._answer(inputs))
            except ServingError as error:
                responses.append(error_response(error))
            except (KeyError, ValueError) as error:
                responses.append(error_response(ServingError(str(error), ServingError.INVALID)))
        return responses

    def _answer(self, inputs):
        if "feedback_context" in inputs:
            context = _names(inputs["feedback_context"])[0]
            drafters = _names(inputs["feedback_drafters"])
            if not len(drafters) == len(inputs["feedback_matches"]) == len(inputs["feedback_trials"]):
                raise ValueError("feedback_drafters, feedback_matches, feedback_trials: lengths differ")
            for drafter, matches, trials in zip(drafters, inputs["feedback_matches"], inputs["feedback_trials"]):
                if trials > 0:
                    self.router.feedback(context, drafter, float(matches), float(trials))
            self._save()
            route = Route(context, [], 0, 0.0)
        else:
            names = _names(inputs["drafter_names"])
            max_drafters = int(inputs["max_drafters"][0]) if "max_drafters" in inputs else 1
            prompt_ids = inputs["prompt_ids"].tolist() if "prompt_ids" in inputs else None
            if "prompt_logprobs" in inputs:
                if len(names) != len(inputs["prompt_logprobs"]):
                    raise ValueError(f"prompt_logprobs: {len(inputs['prompt_logprobs'])} values for {len(names)} "
                                     f"drafter_names")
                route = self.router.route(dict(zip(names, inputs["prompt_logprobs"].astype(float).tolist())),
                                          max_drafters, prompt_ids)
                by = BY_SCORES
            elif prompt_ids is not None:
                route = self.router.classify(prompt_ids, names, max_drafters) or Route("", [], 0, 0.0)
                by = BY_CLASSIFIER
            else:
                raise ValueError("prompt_logprobs or prompt_ids: a route needs one")
            if route.ranking:
                self.routed[route.ranking[0]].increment(1)
                self.routed_by[by].increment(1)
        return pb_utils.InferenceResponse(tensors(ranking=_strings(route.ranking) if route.ranking else
                                                  np.array([b""], np.object_),
                                                  cooperate=np.array([route.cooperate], np.int32),
                                                  context=_strings([route.context]),
                                                  acceptance=np.array([route.acceptance], np.float32)))

    def _save(self) -> None:
        """Written whole and renamed into place: a process killed mid-write leaves the previous state."""
        partial = self.state_file.with_suffix(".partial")
        partial.write_text(json.dumps(self.router.state()))
        os.replace(partial, self.state_file)

    def finalize(self):
        """A server shutting down (or unloading the router) needs the state no more; a killed process never gets
        here, and its state stays for the process that replaces it."""
        self.state_file.unlink(missing_ok=True)
        Metrics.close()

"""A CONTRACT DOUBLE FOR TESTS, never a product engine: the portable engine served under the exact input/output
contract of TensorRT-LLM's `tensorrt_llm` Triton model (contract.TENSORRT_LLM), so that CoSine's TrtllmEngine
adapter runs end to end in a real tritonserver on a machine without a GPU or TensorRT-LLM.

What it mirrors of the tensorrtllm backend, as its code and TensorRT-LLM's documentation describe it:
  - one sequence per request, no state kept between requests (each request prefills its whole input_ids);
  - request_output_len: tokens generated after input_ids, accepted draft tokens included; generation stops there
    or at end_id, which is not returned (its request may return no token at all);
  - draft_input_ids: a chain checked by token match against the model's own token at each position (argmax, or
    a draw with the request's sampling parameters), then the model's own token follows;
  - exclude_input_in_output (request input, else the model parameter): output_ids holds only the generated tokens;
    output_ids [1, beams, tokens] and sequence_length [1, beams] count what output_ids holds;
  - return_generation_logits: [1, beams, generated tokens, vocab]; return_context_logits: [1, input tokens, vocab];
  - only requested outputs are returned, and output_ids and sequence_length must be requested;
  - min_tokens: end_id is not generated before that many tokens; runtime_top_k 1 is greedy.
Generation logits are the log of the engine's untempered softmax (the same distribution, up to a constant).
"""
import itertools
import os
import sys

sys.path[:0] = filter(None, os.environ.get("COSINE_PYTHONPATH", "").split(os.pathsep))  # the stub ignores PYTHONPATH

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from cosine.contract import TENSORRT_LLM  # noqa: E402
from cosine.engine.checkpoint import load_causal_lm  # noqa: E402
from cosine.engine.engine import Admission, CausalLMEngine, StepRequest  # noqa: E402
from cosine.engine.sampling import SamplingParams  # noqa: E402
from cosine.speculation.tree import DraftTree  # noqa: E402
from cosine.triton.io import model_parameters, request_inputs  # noqa: E402

CHECKPOINT_PARAMETER = "contract_double_checkpoint"


class _Job:
    """One request: its sequence in the engine and what it generated so far."""

    def __init__(self, sequence_id, inputs, exclude_default):
        scalar = lambda name, default=None: (inputs[name].reshape(-1)[0].item()  # noqa: E731
                                             if name in inputs else default)
        self.input_ids = inputs["input_ids"].reshape(-1).tolist()
        if scalar("input_lengths") != len(self.input_ids):
            raise ValueError(f"input_lengths: {scalar('input_lengths')} but input_ids has {len(self.input_ids)}")
        self.wanted = scalar("request_output_len")
        if self.wanted is None or self.wanted < 1:
            raise ValueError(f"request_output_len: must be >= 1, got {self.wanted}")
        self.draft = inputs["draft_input_ids"].reshape(-1).tolist() if "draft_input_ids" in inputs else []
        self.end_id = scalar("end_id")
        top_p = scalar("runtime_top_p", 1.0)
        self.params = SamplingParams(scalar("temperature", 1.0), scalar("runtime_top_k", 0),
                                     top_p if top_p > 0 else 1.0, scalar("seed", 0))
        self.min_tokens = scalar("min_tokens", 0)
        self.generation_logits = bool(scalar("return_generation_logits", False))
        self.context_logits = bool(scalar("return_context_logits", False))
        self.exclude_input = bool(scalar("exclude_input_in_output", exclude_default))
        self.sequence_id = sequence_id
        self.tokens, self.distributions = [], []
        self.done = False

    def first_step(self, vocab: int) -> StepRequest:
        admission = Admission(self.wanted, self.params, self.end_id if self.min_tokens else None, self.min_tokens)
        return StepRequest(self.sequence_id, self.input_ids, DraftTree.chain(self.draft), admission,
                           candidates=vocab if self.generation_logits else 0)

    def next_step(self, vocab: int) -> StepRequest:
        return StepRequest(self.sequence_id, self.tokens[-1:], extra_tokens=self.wanted - len(self.tokens) - 1,
                           candidates=vocab if self.generation_logits else 0)

    def take(self, result, vocab: int) -> None:
        for token, ids, probs in zip(result.tokens, result.top_ids, result.top_probs):
            if token == self.end_id or len(self.tokens) == self.wanted:
                self.done = True
                return
            self.tokens.append(token)
            if self.generation_logits:
                self.distributions.append(np.zeros(vocab, np.float32))
                self.distributions[-1][ids] = probs
        self.done = len(self.tokens) == self.wanted


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        torch.set_num_threads(1)
        model = load_causal_lm(params[CHECKPOINT_PARAMETER], "cpu", torch.float32)
        self.engine = CausalLMEngine(model, kv_cache_tokens=8192)
        self.vocab = self.engine.vocab_size
        self.exclude_default = params.get("exclude_input_in_output", "false") == "true"
        self.sequence_ids = itertools.count(1)

    def execute(self, requests):
        """Every request of the batch steps together, like in-flight batching: the first step prefills and checks
        the draft, later steps continue until each has request_output_len tokens or stopped at end_id."""
        responses, jobs = [None] * len(requests), {}
        for slot, request in enumerate(requests):
            try:
                jobs[slot] = _Job(next(self.sequence_ids), request_inputs(request, TENSORRT_LLM),
                                  self.exclude_default)
            except (KeyError, ValueError) as error:
                responses[slot] = self._error(f"malformed request: {error}")
        steps = {slot: job.first_step(self.vocab) for slot, job in jobs.items()}
        while steps:
            for (slot, step), result in zip(steps.items(), self.engine.step(list(steps.values()))):
                if isinstance(result, Exception):
                    responses[slot] = self._error(str(result))
                    jobs[slot].done = True
                else:
                    jobs[slot].take(result, self.vocab)
            steps = {slot: job.next_step(self.vocab) for slot, job in jobs.items() if not job.done}
        for slot, job in jobs.items():
            self.engine.release(job.sequence_id)
            if responses[slot] is None:
                responses[slot] = self._response(requests[slot], job)
        return responses

    def _response(self, request, job: _Job):
        wanted = set(request.requested_output_names())
        if not {"output_ids", "sequence_length"} <= wanted:
            return self._error("output_ids and sequence_length must be present in the list of output tensors")
        ids = job.tokens if job.exclude_input else job.input_ids + job.tokens
        outputs = {"output_ids": np.array([[ids]], np.int32), "sequence_length": np.array([[len(ids)]], np.int32)}
        if "generation_logits" in wanted and job.generation_logits:
            rows = np.stack(job.distributions) if job.distributions else np.zeros((0, self.vocab), np.float32)
            with np.errstate(divide="ignore"):
                outputs["generation_logits"] = np.log(rows)[None, None]
        if "context_logits" in wanted and job.context_logits:
            with torch.inference_mode():
                logits = self.engine.model(torch.tensor([job.input_ids])).logits[0]
            outputs["context_logits"] = logits.float().numpy()[None]
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, value) for name, value in outputs.items()])

    @staticmethod
    def _error(message: str):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"tensorrt_llm contract double: {message}"))

"""Triton adapters for tokenization (preprocessing) and incremental detokenization (postprocessing)."""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

from ..contract import POSTPROCESSING, PREPROCESSING
from ..serving.errors import InvalidRequest
from ..serving.request import decode_utf8
from ..serving.text import decode_increment
from .io import error_response, model_parameters, request_inputs, resolve_path, tensors


def _load_tokenizer(args):
    return AutoTokenizer.from_pretrained(str(resolve_path(model_parameters(args)["tokenizer_dir"], args)),
                                         local_files_only=True)


class PreprocessingModel:
    def initialize(self, args):
        self.tokenizer = _load_tokenizer(args)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                text = decode_utf8("text_input", request_inputs(request, PREPROCESSING)["text"].reshape(-1)[0])
                ids = np.asarray(self.tokenizer.encode(text), np.int32)
                responses.append(pb_utils.InferenceResponse(tensors(input_ids=ids)))
            except InvalidRequest as error:
                responses.append(error_response(error))
        return responses


class PostprocessingModel:
    def initialize(self, args):
        self.tokenizer = _load_tokenizer(args)

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = {name: array.reshape(-1) for name, array in request_inputs(request, POSTPROCESSING).items()}
            text, advanced = decode_increment(
                self.tokenizer, inputs["token_ids"].tolist(), int(inputs["read_offset"][0]), bool(inputs["final"][0]))
            responses.append(pb_utils.InferenceResponse(tensors(
                text_delta=np.array([text.encode()], np.object_), advanced=np.array([advanced]))))
        return responses

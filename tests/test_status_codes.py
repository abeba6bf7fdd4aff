"""What Triton's frontends send a client for each error code a Python model returns (docs/readme-faults.md).

Pins the measured behaviour of Triton 2.51: /infer maps codes to HTTP statuses, /generate and /generate_stream send
every model error as 400, a gRPC stream carries the message without a status. If an upgrade changes this, the
status-code table in the docs and the limits' documented responses need a look."""
import json
import queue
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from served import FIXTURE_EXIT_TIMEOUT_S

from cosine.launcher import TritonServer, free_ports

MODEL = """
import json, os, sys
sys.path[:0] = filter(None, os.environ.get("COSINE_PYTHONPATH", "").split(os.pathsep))
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(json.loads(args["model_config"]))

    def execute(self, requests):
        responses = []
        for request in requests:
            code = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0].decode()
            response = pb_utils.InferenceResponse(error=pb_utils.TritonError(code, getattr(pb_utils.TritonError, code)))
            if self.decoupled:
                request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                responses.append(response)
        return None if self.decoupled else responses
"""

CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 8
{policy}
input [ {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [ {{ name: "text_output" data_type: TYPE_STRING dims: [ 1 ] }} ]
"""

# code -> HTTP status on /infer of a non-decoupled model (the only endpoint that maps codes)
INFER_STATUS = {"INVALID_ARG": 400, "UNAVAILABLE": 503, "INTERNAL": 500}


@pytest.fixture(scope="module")
def errors_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("status_codes")
    for name, policy in (("plain", ""), ("streaming", "model_transaction_policy { decoupled: true }")):
        (root / "repo" / name / "1").mkdir(parents=True)
        (root / "repo" / name / "config.pbtxt").write_text(CONFIG.format(name=name, policy=policy))
        (root / "repo" / name / "1" / "model.py").write_text(MODEL)
    with TritonServer(root / "repo", *free_ports(3), log_path=root / "triton.log",
                      restore_models=False, exit_timeout=FIXTURE_EXIT_TIMEOUT_S) as server:
        yield server


def http_status(server, path, body) -> int:
    request = urllib.request.Request(f"http://{server.http_url}{path}", json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def grpc_stream_error(server, model, code):
    received = queue.Queue()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.start_stream(callback=lambda result, error: received.put(error))
        text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[code.encode()]], np.object_))
        client.async_stream_infer(model, [text])
        error = received.get(timeout=60)
        client.stop_stream()
    return error


@pytest.mark.parametrize("code", INFER_STATUS)
def test_model_error_codes_reach_clients_as_measured(errors_server, code):
    infer = {"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [code]}]}
    assert http_status(errors_server, "/v2/models/plain/infer", infer) == INFER_STATUS[code]
    for model in ("plain", "streaming"):
        for endpoint in ("generate", "generate_stream"):
            assert http_status(errors_server, f"/v2/models/{model}/{endpoint}", {"text_input": code}) == 400
        error = grpc_stream_error(errors_server, model, code)
        assert error.message() == code and error.status() is None

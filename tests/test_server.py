"""End to end through a real tritonserver: generation, streaming, bad input, cancellation."""
import json
import queue
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from served import as_list, generate, metric, post
from tiny_models import PROMPTS, reference_generate
from tritonclient.utils import InferenceServerException

from cosine.contract import target_model_names
from cosine.deploy.spec import default_replicas
from cosine_client.api import grpc_inputs


def stream_events(server, **body):
    text = post(server, "generate_stream", dict(body, stream=True))
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


@pytest.mark.parametrize("prompt,max_tokens", [(PROMPTS[0], 24), (PROMPTS[2], 7), (PROMPTS[3], 40)])
def test_greedy_matches_transformers_generate(server, llama, prompt, max_tokens):
    out = generate(server, text_input=prompt, max_tokens=max_tokens)
    assert as_list(out["output_ids"]) == reference_generate(llama, prompt, max_tokens)


def test_concurrent_requests_batch_and_match_alone(server, llama):
    """Also across the target's replicas (this machine's default, up to 2): each takes its share of the requests."""
    alone = {p: as_list(generate(server, text_input=p, max_tokens=32)["output_ids"]) for p in PROMPTS}
    replicas = target_model_names(default_replicas("cpu"))
    counters = lambda: {(name, model): metric(server, name, model=model)  # noqa: E731
                        for name in ("cosine_engine_batch_requests_total", "cosine_engine_batches_total")
                        for model in replicas}
    before = counters()
    prompts = PROMPTS * 4
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: as_list(generate(server, text_input=p, max_tokens=32)["output_ids"]),
                                 prompts))
    assert together == [alone[p] for p in prompts]
    assert alone[PROMPTS[1]] == reference_generate(llama, PROMPTS[1], 32)
    after = counters()
    for model in replicas:
        steps = after["cosine_engine_batch_requests_total", model] - before["cosine_engine_batch_requests_total", model]
        batches = after["cosine_engine_batches_total", model] - before["cosine_engine_batches_total", model]
        # one coalesced call per tick: the requests share most engine calls (one BLS call per request: ~2-4)
        assert steps / batches > 8 / len(replicas), \
            f"{model}: {steps} steps in {batches} forwards: concurrent requests were not batched"


def test_stream_concatenates_to_generate_and_grpc_agrees(server):
    body = dict(text_input=PROMPTS[3], max_tokens=30, exclude_input_in_output=True)
    whole = generate(server, **body)
    events = stream_events(server, **body)
    assert len(events) > 1  # the first token, then calls of up to 16 (a chunk without text waits for the next)
    assert "".join(e["text_output"] for e in events) == whole["text_output"]
    assert sum((as_list(e["output_ids"]) for e in events), []) == as_list(whole["output_ids"])

    chunks = queue.Queue()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.start_stream(callback=lambda result, error: chunks.put((result, error)))
        client.async_stream_infer("cosine", grpc_inputs(text_input=PROMPTS[3], max_tokens=30, stream=True,
                                                        exclude_input_in_output=True),
                                  enable_empty_final_response=True)
        texts = []
        while True:
            result, error = chunks.get(timeout=60)
            assert error is None, error
            if result.as_numpy("text_output") is not None:
                texts.append(result.as_numpy("text_output").reshape(-1)[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        client.stop_stream()
    assert "".join(texts) == whole["text_output"]


def test_prompt_is_included_unless_excluded(server):
    with_prompt = generate(server, text_input=PROMPTS[4], max_tokens=5)["text_output"]
    without = generate(server, text_input=PROMPTS[4], max_tokens=5, exclude_input_in_output=True)["text_output"]
    assert with_prompt == PROMPTS[4] + without


def test_stop_words_end_the_output(server):
    full = generate(server, text_input=PROMPTS[0], max_tokens=30, exclude_input_in_output=True)["text_output"]
    stop = full[10:13]
    out = generate(server, text_input=PROMPTS[0], max_tokens=30, exclude_input_in_output=True, stop_words=[stop])
    assert out["text_output"] == full[:full.index(stop)]


def test_seeded_sampling_is_reproducible(server):
    body = dict(text_input=PROMPTS[1], max_tokens=20, temperature=1.0, top_k=50, top_p=0.9)
    a = as_list(generate(server, random_seed=7, **body)["output_ids"])
    b = as_list(generate(server, random_seed=7, **body)["output_ids"])
    c = as_list(generate(server, random_seed=8, **body)["output_ids"])
    assert a == b and a != c


@pytest.mark.parametrize("body,field", [
    (dict(text_input=""), "text_input"),
    (dict(text_input="hi", max_tokens=0), "max_tokens"),
    (dict(text_input="hi", max_tokens=-5), "max_tokens"),
    (dict(text_input="hi", max_tokens=100000), "max_tokens"),
    (dict(text_input="hi", temperature=-0.5), "temperature"),
    (dict(text_input="hi", top_p=0.0), "top_p"),
    (dict(text_input="hi", top_p=1.5), "top_p"),
    (dict(text_input="hi", top_k=-1), "top_k"),
])
def test_bad_input_is_a_400_naming_the_field(server, body, field):
    with pytest.raises(urllib.error.HTTPError) as caught:
        generate(server, **body)
    assert caught.value.code == 400
    assert json.loads(caught.value.read())["error"].startswith(field)
    assert generate(server, text_input="still serving", max_tokens=2)["sequence_length"] == 2
    assert wait_for(lambda: metric(server, "cosine_active_sequences", model="target") == 0)  # nothing leaked


def grpc_stream_error(server, inputs) -> str:
    """The error a gRPC stream reports for one request (a decoupled model answers on streams only)."""
    received = queue.Queue()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.start_stream(callback=lambda result, error: received.put(error))
        client.async_stream_infer("cosine", inputs)
        error = received.get(timeout=60)
        client.stop_stream()
    assert isinstance(error, InferenceServerException), "the request was accepted"
    return error.message()


def _raw(name, array, datatype):
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.mark.parametrize("case,field", [
    ("nan_temperature", "temperature"),
    ("invalid_utf8", "text_input"),
    ("wrong_dtype", "max_tokens"),
    ("wrong_shape", "max_tokens"),
    ("batch_of_two", "text_input"),
])
def test_bad_grpc_input_is_reported_naming_the_field(server, case, field):
    text = _raw("text_input", np.array([[b"hello"]], dtype=object), "BYTES")
    inputs = {
        "nan_temperature": [text, _raw("temperature", np.array([[np.nan]], np.float32), "FP32")],
        "invalid_utf8": [_raw("text_input", np.array([[b"ab\xff\xfe"]], dtype=object), "BYTES")],
        "wrong_dtype": [text, _raw("max_tokens", np.array([[4.0]], np.float32), "FP32")],
        "wrong_shape": [text, _raw("max_tokens", np.array([[4, 5]], np.int32), "INT32")],
        "batch_of_two": [_raw("text_input", np.array([[b"a"], [b"b"]], dtype=object), "BYTES")],
    }[case]
    assert field in grpc_stream_error(server, inputs)
    assert generate(server, text_input="still serving", max_tokens=2)["sequence_length"] == 2


def test_grpc_cancel_mid_stream_frees_the_kv_cache(server):
    cancelled_before = metric(server, "cosine_requests_total", status="cancelled")
    received = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: received.put((result, error)))
    client.async_stream_infer("cosine", grpc_inputs(text_input=PROMPTS[5], max_tokens=200, stream=True))
    received.get(timeout=60)  # generation is under way (counted "cancelled" below, not "success", only if it still was)
    client.stop_stream(cancel_requests=True)
    client.close()
    assert wait_for(lambda: metric(server, "cosine_requests_total", status="cancelled") > cancelled_before)
    assert wait_for(lambda: metric(server, "cosine_active_sequences", model="target") == 0)
    assert metric(server, "cosine_kv_cache_reserved_tokens", model="target") == 0


def test_http_disconnect_mid_stream_frees_the_kv_cache(server):
    cancelled_before = metric(server, "cosine_requests_total", status="cancelled")
    host, port = server.http_url.split(":")
    body = json.dumps(dict(text_input=PROMPTS[6], max_tokens=200, stream=True)).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v2/models/cosine/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert re.search(rb"data: ", sock.recv(4096) + sock.recv(4096))
    assert wait_for(lambda: metric(server, "cosine_requests_total", status="cancelled") > cancelled_before)
    assert wait_for(lambda: metric(server, "cosine_active_sequences", model="target") == 0)



def test_min_length_holds_back_the_end_token(server):
    free = as_list(generate(server, text_input=PROMPTS[2], max_tokens=10)["output_ids"])
    stopped = generate(server, text_input=PROMPTS[2], max_tokens=10, end_id=free[2])
    assert stopped["sequence_length"] == 2
    held = generate(server, text_input=PROMPTS[2], max_tokens=10, end_id=free[2], min_length=10)
    assert held["sequence_length"] == 10 and free[2] not in as_list(held["output_ids"])

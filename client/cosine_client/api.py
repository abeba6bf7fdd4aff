"""Calling the `cosine` model over HTTP (generate / generate_stream) and gRPC (streaming)."""
from __future__ import annotations

import json
import queue
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from cosine.contract import COSINE

_GRPC_DATATYPES = {np.int32: "INT32", np.float32: "FP32", np.bool_: "BOOL", np.uint64: "UINT64", np.object_: "BYTES"}


@dataclass
class Event:
    """One streamed response (or the whole answer when not streaming), with its arrival time."""
    text: str
    output_ids: list[int]
    arrived: float
    stats: list[int] = field(default_factory=list)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def http_generate(url: str, stream: bool = False, model: str = "cosine", timeout: float = 600, **inputs) \
        -> Iterator[Event]:
    """Yields events from /v2/models/<model>/generate(_stream). `url` is host:port."""
    endpoint = "generate_stream" if stream else "generate"
    body = json.dumps(dict(inputs, stream=stream)).encode()
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/{endpoint}", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        lines = response if stream else [b"data: " + response.read()]
        for line in lines:
            line = line.strip()
            if line.startswith(b"data: "):
                payload = json.loads(line[len(b"data: "):])
                if "error" in payload:
                    raise RuntimeError(payload["error"])
                yield Event(payload.get("text_output", ""), _as_list(payload.get("output_ids", [])),
                            time.perf_counter(), _as_list(payload.get("speculation_stats", [])))


def grpc_inputs(**values) -> list:
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, array in COSINE.pack(**values):
        if array.dtype == np.object_:
            array = np.array([[v.encode() if isinstance(v, str) else v for v in array.reshape(-1)]], dtype=object)
        tensor = grpcclient.InferInput(name, list(array.shape), _GRPC_DATATYPES[array.dtype.type])
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def grpc_generate(url: str, stream: bool = False, model: str = "cosine", timeout: float = 600, **inputs) \
        -> Iterator[Event]:
    """Yields events over a gRPC stream (decoupled models answer on streams only)."""
    import tritonclient.grpc as grpcclient

    received: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(url) as client:
        client.start_stream(callback=lambda result, error: received.put((result, error, time.perf_counter())))
        try:
            client.async_stream_infer(model, grpc_inputs(stream=stream, **inputs), enable_empty_final_response=True)
            while True:
                result, error, arrived = received.get(timeout=timeout)
                if error is not None:
                    raise RuntimeError(error.message())
                text = result.as_numpy("text_output")
                if text is not None:
                    ids = result.as_numpy("output_ids")
                    stats = result.as_numpy("speculation_stats")
                    yield Event(text.reshape(-1)[0].decode(), [] if ids is None else ids.reshape(-1).tolist(),
                                arrived, [] if stats is None else stats.reshape(-1).tolist())
                if result.get_response().parameters["triton_final_response"].bool_param:
                    return
        finally:
            client.stop_stream()

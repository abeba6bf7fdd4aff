"""Moving tensors between pb_utils objects and the contract's numpy values."""
from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ..contract import ENGINE, METRICS_FLUSH_S
from ..launcher import stub_alive, stub_processes
from ..serving.errors import ServingError

# how often a BLS call still waiting checks that the called model's process lives
PROCESS_CHECK_S = 0.25


def _code(kind: str):
    # pb_utils.TritonError only exists once the stub runs the model, not at import time
    codes = {ServingError.INVALID: "INVALID_ARG", ServingError.UNAVAILABLE: "UNAVAILABLE"}
    return getattr(pb_utils.TritonError, codes.get(kind, "INTERNAL"))


def _kind(code) -> str:
    for kind in (ServingError.INVALID, ServingError.UNAVAILABLE):
        if code == _code(kind):
            return kind
    return ServingError.INTERNAL


def request_inputs(request, contract) -> dict[str, np.ndarray]:
    """The request's tensors by name (with their batch dimension); absent optional inputs are left out."""
    inputs = {}
    for spec in contract.inputs:
        tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
        if tensor is not None:
            inputs[spec.name] = tensor.as_numpy()
    return inputs


def tensors(**arrays) -> list:
    """pb_utils tensors with a leading batch dimension of 1."""
    return [pb_utils.Tensor(name, np.asarray(array)[None]) for name, array in arrays.items()]


def error_response(error: Exception):
    kind = getattr(error, "kind", ServingError.INTERNAL)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), _code(kind)))


def freeze_heap() -> None:
    """The end of a model's initialize: what it built (its tokenizer or checkpoint, the modules it imported) moves
    out of the collector's reach for good. Unfrozen, a full collection in the `cosine` process scanned all of it:
    122 ms of stalled event loop, every request waiting, in the middle of a c64 run (209 ms at start-up)."""
    gc.collect()
    gc.freeze()


def model_parameters(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def resolve_path(path: str, args: dict) -> Path:
    """Relative paths in a model's parameters are relative to its model repository."""
    return Path(args["model_repository"]).parent.joinpath(path).resolve()


async def bls(model_name: str, contract, outputs: tuple[str, ...], **values) -> dict[str, np.ndarray]:
    """One BLS call with named values packed by the contract; returns the outputs without their batch dimension."""
    return await bls_arrays(model_name, outputs, dict(contract.pack(**values)))


async def bls_arrays(model_name: str, outputs, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One BLS call; arrays get a leading batch dimension of 1 unless they have it."""
    request = pb_utils.InferenceRequest(
        model_name=model_name,
        requested_output_names=list(outputs),
        inputs=[pb_utils.Tensor(name, array if array.ndim > 1 else array[None]) for name, array in arrays.items()],
    )
    response = await _unless_process_dies(model_name, request.async_exec())
    if response.has_error():
        error = response.error()
        raise ServingError(f"{model_name}: {error.message()}", _kind(error.code()))
    ProcessHealth.answered(model_name)
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy()[0] for name in outputs}


async def _unless_process_dies(model_name: str, call):
    """The call's response, or a ServingError as soon as the processes that could serve it are gone.

    Measured on Triton 2.51: a call to a model whose stub was killed fails after ~1 s ("Stub process is not
    healthy"), and calls queued behind it wait until the model has been restored (seconds to minutes). Its stubs are
    our siblings (children of tritonserver), so a look at /proc tells at once. A process the watchdog starts for the
    model meanwhile does not count: it cannot answer a call queued at the dead one."""
    serving = ProcessHealth.stubs(model_name)
    pending = asyncio.ensure_future(call)
    dead = lambda: not any(stub_alive(pid, os.getppid()) for pid in serving)  # noqa: E731
    while True:
        done, _ = await asyncio.wait({pending}, timeout=PROCESS_CHECK_S)
        if done:
            # Triton may fail it first ("Stub process is not healthy"): the death still counts
            if pending.result().has_error() and dead():
                ProcessHealth.died(model_name)
            return pending.result()
        if dead():
            pending.add_done_callback(lambda task: task.exception())  # Triton answers it later: nobody waits
            ProcessHealth.died(model_name)
            raise ServingError(f"{model_name}: its process died; the deployment's watchdog restores it")


class ProcessHealth:
    """The stub processes of the models this process calls, their deaths, and their comebacks (the first answer
    after a death): the launcher's watchdog restores them, but Triton 2.51 has no metric for model loads."""

    dead: set[str] = set()
    by_model: dict[str, set[int]] = {}  # as the last /proc scan found them
    checked_at: dict[str, float] = {}

    @classmethod
    def stubs(cls, model_name: str) -> set[int]:
        """The model's live stub pids, checked at most every PROCESS_CHECK_S: by a look at each one known, and by a
        scan of /proc only when one of them died (the watchdog gives a restored model new ones) or none is known.
        Made on the event loop before each call: a scan every time it is checked stalled it 2-3 ms, 6% of the
        process's busy time at c32."""
        now = time.monotonic()
        pids = cls.by_model.get(model_name, set())
        if now - cls.checked_at.get(model_name, float("-inf")) > PROCESS_CHECK_S:
            server = os.getppid()
            if not pids or not all(stub_alive(pid, server) for pid in pids):
                cls.by_model = {}
                for pid, model in stub_processes(server).items():
                    cls.by_model.setdefault(model, set()).add(pid)
                pids = cls.by_model.get(model_name, set())
            cls.checked_at[model_name] = now
        return pids

    @classmethod
    def died(cls, model_name: str) -> None:
        if model_name not in cls.dead:
            cls.dead.add(model_name)
            cls._count("cosine_model_process_deaths_total", "Called models whose process died", model_name)

    @classmethod
    def answered(cls, model_name: str) -> None:
        if model_name in cls.dead:
            cls.dead.discard(model_name)
            cls._count("cosine_model_restores_total", "Called models answering again after their process died",
                       model_name)

    @staticmethod
    def _count(name: str, description: str, model_name: str) -> None:
        Metrics.metric(name, description, model=model_name).increment(1)


def engine_transport(model_name: str):
    """The CoalescingEngine transport to an engine model in this server."""
    outputs = tuple(t.name for t in ENGINE.outputs)
    return lambda arrays: bls_arrays(model_name, outputs, arrays)


def trtllm_transport(model_name: str):
    """The TrtllmEngine transport to a `tensorrt_llm` model: one request, asking only for the outputs it needs (the
    tensorrtllm backend returns nothing else)."""
    return lambda arrays, outputs: bls_arrays(model_name, outputs, arrays)


class Metrics:
    """Prometheus families and their labelled metrics, each created once per process (on first use); a daemon
    thread sends their updates every METRICS_FLUSH_S, off the path of the calls that make them. Every pb_utils update
    is a round trip to the server process: about 35 us on the idle 2-core machine, but while both cores are busy a
    wait for tritonserver to be scheduled; made inside execute, an engine call's ~7 updates cost its caller 1-3 ms
    (a drafter at c1 cosine: 3.5 ms of each call outside its engine step before, 1.9 ms after). The round trip holds
    the GIL (pb_utils does not release it), so the thread's sends stall the process's event loop too: a counter is
    sent once per flush whatever its increments, a histogram once per observation (for rare events only)."""

    _families: dict = {}
    _metrics: dict = {}
    _flusher: threading.Thread | None = None
    _stop = threading.Event()

    @classmethod
    def family(cls, name: str, description: str, kind: str = "COUNTER"):
        if name not in cls._families:
            cls._families[name] = pb_utils.MetricFamily(
                name=name, description=description, kind=getattr(pb_utils.MetricFamily, kind))
        return cls._families[name]

    @classmethod
    def metric(cls, name: str, description: str, kind: str = "COUNTER", buckets=None, **labels) -> "Metric":
        key = (name, tuple(sorted(labels.items())))
        if key not in cls._metrics:
            family = cls.family(name, description, kind)
            cls._metrics[key] = Metric(family.Metric(labels=labels, buckets=buckets) if buckets
                                       else family.Metric(labels=labels))
            if cls._flusher is None:  # the process's first metric starts the thread that sends updates
                cls._flusher = threading.Thread(target=cls._flush_periodically, name="metrics", daemon=True)
                cls._flusher.start()
        return cls._metrics[key]

    @classmethod
    def _flush_periodically(cls) -> None:
        while not cls._stop.wait(METRICS_FLUSH_S):
            cls.flush()

    @classmethod
    def flush(cls) -> None:
        for metric in list(cls._metrics.values()):
            metric.flush()

    @classmethod
    def close(cls) -> None:
        """Sends what is pending and stops the thread (a model's finalize: the stub ends after it)."""
        cls._stop.set()
        if cls._flusher is not None:
            cls._flusher.join()
        cls.flush()


class Metric:
    """A pb_utils metric whose updates collect here until Metrics' thread sends them: a sum of increments, the last
    value set (sent only when it changed), the observations (a histogram takes them one by one)."""

    def __init__(self, metric):
        self.metric, self.lock = metric, threading.Lock()
        self.added, self.value, self.sent, self.observed = 0.0, None, None, []

    def increment(self, amount) -> None:
        if amount:
            with self.lock:
                self.added += amount

    def set(self, value) -> None:
        self.value = value

    def observe(self, value) -> None:
        with self.lock:
            self.observed.append(value)

    def flush(self) -> None:
        with self.lock:
            (added, self.added), (observed, self.observed) = (self.added, 0.0), (self.observed, [])
        if added:
            self.metric.increment(added)
        value = self.value
        if value is not None and value != self.sent:
            self.sent = value
            self.metric.set(value)
        for value in observed:
            self.metric.observe(value)

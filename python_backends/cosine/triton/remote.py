"""The CoalescingEngine transport to an engine model on another Triton server: gRPC through tritonclient's asyncio
client, the same ENGINE contract and the same coalesced calls as BLS."""
from __future__ import annotations

import asyncio

import numpy as np
from tritonclient.grpc import aio as grpc_aio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from ..contract import ENGINE
from ..serving.errors import ServingError

CHANNEL_ARGS = [
    ("grpc.max_send_message_length", grpc_aio.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", grpc_aio.MAX_GRPC_MESSAGE_SIZE),
    # a channel of its own connection: gRPC otherwise shares connections between a process's channels to one
    # address, and a new channel would inherit a failed one's reconnect backoff
    ("grpc.use_local_subchannel_pool", 1),
]
_KINDS = {"StatusCode.INVALID_ARGUMENT": ServingError.INVALID, "StatusCode.UNAVAILABLE": ServingError.UNAVAILABLE}
# the call never reached the model: the connection, not the node's answer, failed
_CONNECTION_FAILURES = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED"}


class GrpcEngineTransport:
    def __init__(self, url: str, model_name: str):
        self.url, self.model_name = url, model_name
        self.outputs = [grpc_aio.InferRequestedOutput(t.name) for t in ENGINE.outputs]
        self.client: grpc_aio.InferenceServerClient | None = None  # made in the event loop that calls it
        self.closing: set[asyncio.Task] = set()

    async def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Sends every array it is given as it is (with a leading batch dimension of 1, as BLS does)."""
        if self.client is None:
            self.client = grpc_aio.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        client = self.client
        inputs = []
        for name, array in arrays.items():
            batched = array if array.ndim > 1 else array[None]
            tensor = grpc_aio.InferInput(name, list(batched.shape), np_to_triton_dtype(batched.dtype))
            tensor.set_data_from_numpy(batched)
            inputs.append(tensor)
        try:
            result = await client.infer(self.model_name, inputs, outputs=self.outputs)
        except InferenceServerException as error:
            if str(error.status()) in _CONNECTION_FAILURES:
                self._drop(client)
            raise ServingError(f"{self.model_name} at {self.url}: {error.message()}",
                               _KINDS.get(str(error.status()), ServingError.INTERNAL)) from None
        except asyncio.CancelledError:
            # This task's cancellation is the caller's timeout: the connection may be dead without knowing it.
            # (Task.cancelling() is Python 3.11+; before, every cancellation counts as the caller's.)
            if getattr(asyncio.current_task(), "cancelling", lambda: 1)():
                self._drop(client)
                raise
            # not this task's: the call's channel was closed under it (another call on it failed)
            raise ServingError(f"{self.model_name} at {self.url}: connection dropped",
                               ServingError.UNAVAILABLE) from None
        return {output.name(): result.as_numpy(output.name())[0] for output in self.outputs}

    def _drop(self, client: grpc_aio.InferenceServerClient) -> None:
        """The next call opens a new channel. A connection whose peer vanished without closing it (a node lost, a
        network partition) would otherwise hang every later call, probes included, until TCP gives up; and a new
        channel connects at once where a failed one waits out gRPC's reconnect backoff (up to 2 minutes)."""
        if self.client is not client:  # a call on an older channel, already dropped
            return
        self.client = None
        closing = asyncio.ensure_future(client.close())
        self.closing.add(closing)
        closing.add_done_callback(self.closing.discard)

"""Two Triton servers on loopback: the target's node, and a drafter node reached over gRPC through a relay that adds
latency. Outputs stay exact; the drafter node may stop under load (no request fails) and is used again once back."""
import asyncio
import contextlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from served import as_list, drop_text_models, generate, metric
from test_server import wait_for
from tiny_models import PROMPTS

from cosine.contract import DEPLOYMENT_SECRET_ENV
from cosine.deploy.repository import write_repository
from cosine.deploy.spec import parse_spec
from cosine.launcher import TritonServer, free_ports
from cosine.serving.errors import ServingError
from cosine.triton.remote import GrpcEngineTransport
from cosine_client.relay import Relay

# the per-deployment secret both nodes must share (read from the environment by the engines and `cosine`)
NODE_ENV = {DEPLOYMENT_SECRET_ENV: "two-node-test"}


def test_the_relay_delays_each_direction_and_keeps_the_bytes():
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        def echo():
            connection, _ = upstream.accept()
            with connection:
                while data := connection.recv(65536):
                    connection.sendall(data)
        threading.Thread(target=echo, daemon=True).start()
        with Relay(f"127.0.0.1:{upstream.getsockname()[1]}", delay_s=0.05).running() as relay:
            with socket.create_connection(("127.0.0.1", relay.port)) as client:
                payload = bytes(range(256)) * 1000
                started = time.monotonic()
                client.sendall(payload)
                echoed = b""
                while len(echoed) < len(payload):
                    echoed += client.recv(65536)
                round_trip = time.monotonic() - started
    assert echoed == payload
    assert round_trip >= 0.1  # 50 ms each way


def test_a_call_that_hangs_is_not_followed_on_the_same_connection():
    """A node that vanished without closing its connections (a partition, a host powered off; here: one that accepts
    and never answers) leaves calls hanging until the breaker's timeout; the next call, the probe, must open a new
    connection rather than wait on the dead one."""
    connections = []
    with socket.create_server(("127.0.0.1", 0)) as black_hole:  # accepts, never answers
        def accept():
            with contextlib.suppress(OSError):
                while True:
                    connections.append(black_hole.accept()[0])
        threading.Thread(target=accept, daemon=True).start()
        transport = GrpcEngineTransport(f"127.0.0.1:{black_hole.getsockname()[1]}", "drafter_x")

        def call():
            return transport({"sequence_id": np.array([1], np.uint64)})

        async def calls():
            patient = asyncio.ensure_future(asyncio.wait_for(call(), 60))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(call(), 0.5)
            # a call still out on the dropped connection fails at once, as a failed call, not a lost one
            with pytest.raises(ServingError, match="connection dropped"):
                await asyncio.wait_for(patient, 10)
            before = len(connections)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(call(), 0.5)
            return before
        connected_before_last_call = asyncio.run(calls())
    for connection in connections:
        connection.close()
    assert connected_before_last_call >= 1 and len(connections) > connected_before_last_call


class Nodes:
    """The target's node, and a drafter node (`edge`) behind a relay adding 2 ms of round trip."""

    def __init__(self, root, llama, relay: Relay, edge_ports, main_ports):
        engine = {"kv_cache_tokens": 8192, "num_threads": 1, "idle_timeout_s": 30}
        spec = parse_spec({
            "target": dict(engine, checkpoint=str(llama)),
            "nodes": {"edge": {"url": relay.url}},
            # the target's own checkpoint drafts perfectly: every accepted token proves the remote drafter's work
            "drafters": {"itself": dict(engine, checkpoint=str(llama), node="edge")},
            "speculation_mode": "autoregressive", "drafter_probe_after_s": 0.5}, root)
        self.root, self.edge_ports = root, edge_ports
        self.edge_repository = write_repository(spec, root / "edge", node="edge")
        main_repository = drop_text_models(write_repository(spec, root / "main"))
        self.main = TritonServer(main_repository, *main_ports, log_path=root / "main.log",
                                 env=NODE_ENV)
        self.edge = self.new_edge()
        try:
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda server: server.start(timeout=300), (self.edge, self.main)))
        except BaseException:
            self.stop()
            raise

    def new_edge(self):
        return TritonServer(self.edge_repository, *self.edge_ports, log_path=self.root / "edge.log", env=NODE_ENV)

    def stop(self):
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(TritonServer.stop, (self.main, self.edge)))


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, llama):
    ports = free_ports(6)  # both servers' at once: distinct
    edge_ports, main_ports = ports[:3], ports[3:]
    with Relay(f"127.0.0.1:{edge_ports[1]}", delay_s=0.001).running() as relay:
        nodes = Nodes(tmp_path_factory.mktemp("two-nodes"), llama, relay, edge_ports, main_ports)
        yield nodes
        nodes.stop()


def run(server, prompt, **extra):
    out = generate(server, text_input=prompt, max_tokens=24, return_stats=True, **extra)
    return as_list(out["output_ids"]), as_list(out["speculation_stats"])


def test_remote_drafters_keep_greedy_outputs_exact(nodes):
    accepted = {"vanilla": [], "cosine": []}
    for prompt in PROMPTS[:2]:
        plain, _ = run(nodes.main, prompt, speculation_mode="autoregressive")
        for mode in accepted:
            # fixed length: adaptive cosine may measure that a drafter as large as the target, 2 ms away, does not
            # pay, and decode plainly
            ids, (_, _, accepted_tokens) = run(nodes.main, prompt, speculation_mode=mode, num_draft_tokens=4,
                                               adaptive_draft_length=False)
            assert ids == plain, mode
            accepted[mode].append(accepted_tokens)
    assert all(accepted["vanilla"]) and all(accepted["cosine"]), accepted  # drafted on the other node, over gRPC
    assert metric(nodes.main, "cosine_drafter_up", drafter="itself") == 1


def test_a_drafter_node_that_stops_under_load_is_routed_around_and_used_again_when_back(nodes):
    expected = {p: run(nodes.main, p, speculation_mode="autoregressive")[0] for p in PROMPTS}
    done, failures, stop = [], [], threading.Event()

    def load(worker):
        while not stop.is_set():
            prompt = PROMPTS[len(done) % len(PROMPTS)]
            try:
                ids, _ = run(nodes.main, prompt, speculation_mode=("vanilla", "cosine")[worker % 2])
                done.append(ids == expected[prompt])
            except Exception as error:  # noqa: BLE001 -- any failed request fails the test
                failures.append(error)

    with ThreadPoolExecutor(8) as pool:
        workers = [pool.submit(load, worker) for worker in range(8)]
        assert wait_for(lambda: len(done) >= 8)
        nodes.edge.stop(timeout=0)  # killed: the node disappears
        assert wait_for(lambda: metric(nodes.main, "cosine_drafter_up", drafter="itself") == 0)
        served_while_down = len(done)
        assert wait_for(lambda: len(done) >= served_while_down + 8)
        stop.set()
        for worker in workers:
            worker.result()
    assert failures == [] and all(done)
    assert metric(nodes.main, "cosine_drafter_failures_total", drafter="itself") > 0
    assert run(nodes.main, PROMPTS[0], speculation_mode="vanilla")[1][1] == 0  # nothing drafted while it is down

    nodes.edge = nodes.new_edge().start(timeout=300)
    assert wait_for(lambda: run(nodes.main, PROMPTS[0], speculation_mode="vanilla")[1][2] > 0, timeout=60)
    assert metric(nodes.main, "cosine_drafter_up", drafter="itself") == 1

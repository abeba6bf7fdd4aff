"""End-to-end tests of cosine.launcher and `cosine serve` against a real tritonserver (CPU)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from cosine.launcher import SERVER_RESTORE, LaunchError, TritonServer, free_ports, port_in_use, stub_processes

CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "IN", data_type: TYPE_INT32, dims: [ -1 ] }} ]
output [ {{ name: "OUT", data_type: TYPE_INT32, dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
"""

MODEL = """
import os, sys
sys.path[:0] = filter(None, os.environ.get("COSINE_PYTHONPATH", "").split(os.pathsep))
import numpy
import triton_python_backend_utils as pb_utils
{extra}

class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            y = pb_utils.Tensor("OUT", (x * 2).astype(numpy.int32))
            out.append(pb_utils.InferenceResponse(output_tensors=[y]))
        return out
"""


def make_repo(root: Path, name: str = "double", extra: str = "") -> Path:
    model = root / "repo" / name
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(CONFIG.format(name=name))
    (model / "1" / "model.py").write_text(MODEL.format(extra=extra))
    return root / "repo"


def ports() -> dict:
    return dict(zip(("http_port", "grpc_port", "metrics_port"), free_ports(3)))


def test_serves_and_stops(tmp_path):
    repo = make_repo(tmp_path)
    server = TritonServer(repo, log_path=tmp_path / "triton.log", **ports())
    with server:
        proc = server.process
        client = httpclient.InferenceServerClient(server.http_url)
        assert client.is_model_ready("double")
        inp = httpclient.InferInput("IN", [4], "INT32")
        inp.set_data_from_numpy(np.array([1, 2, 3, -7], dtype=np.int32))
        result = client.infer("double", [inp])
        np.testing.assert_array_equal(result.as_numpy("OUT"), [2, 4, 6, -14])
        # An open keep-alive connection would hold shutdown for exit_timeout, then exit with code 1.
        client.close()
        t0 = time.monotonic()
        assert server.stop() == 0  # graceful exit, not SIGKILL
        assert time.monotonic() - t0 < server.exit_timeout
    assert server.process is None
    assert proc.poll() is not None  # the server process is gone
    assert not port_in_use(server.ports["http"])
    assert not list(Path("/dev/shm").glob(server.shm_prefix + "*"))
    assert "double" in (tmp_path / "triton.log").read_text()


def _doubles(server, model="double") -> bool:
    try:
        with httpclient.InferenceServerClient(server.http_url) as client:
            inp = httpclient.InferInput("IN", [2], "INT32")
            inp.set_data_from_numpy(np.array([1, 2], dtype=np.int32))
            return client.infer(model, [inp]).as_numpy("OUT").tolist() == [2, 4]
    except Exception:
        return False


def _ready(server) -> bool:
    with httpclient.InferenceServerClient(server.http_url) as client:
        return client.is_server_ready()


def _poll(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize("model,stays_ready,deaths", [("double", False, 1), ("drafter_double", True, 2)])
def test_watchdog_restores_a_model_whose_stub_died(tmp_path, model, stays_ready, deaths):
    """A drafter is reloaded in place (the server stays ready); any other model is unloaded until it is back."""
    with TritonServer(make_repo(tmp_path, model), log_path=tmp_path / "triton.log", **ports()) as server:
        for restores in range(1, deaths + 1):  # a drafter's second death: Triton skips a plain reload
            stub = next(iter(stub_processes(server.process.pid)))
            os.kill(stub, signal.SIGKILL)
            readiness = set()
            while server.restores[model] < restores:
                readiness.add(_ready(server))
                time.sleep(0.02)
            assert readiness == {True} if stays_ready else False in readiness
            _poll(lambda: _doubles(server, model))
            assert stub not in stub_processes(server.process.pid)


def test_watchdog_restarts_a_dead_server(tmp_path):
    with TritonServer(make_repo(tmp_path), log_path=tmp_path / "triton.log", **ports()) as server:
        first = server.process
        first.kill()
        _poll(lambda: server.restores[SERVER_RESTORE] == 1)
        assert server.process is not first and _doubles(server)


def test_port_in_use_is_reported_before_launch(tmp_path):
    repo = make_repo(tmp_path)
    p = ports()
    with socket.socket() as s:
        s.bind(("127.0.0.1", p["grpc_port"]))
        s.listen()
        assert port_in_use(p["grpc_port"])
        server = TritonServer(repo, log_path=tmp_path / "triton.log", **p)
        with pytest.raises(LaunchError, match=f"grpc port {p['grpc_port']} is already in use.*--grpc-port"):
            server.start()
    assert server.process is None
    assert not (tmp_path / "triton.log").exists()  # nothing was launched


@pytest.mark.parametrize("kind", ["missing", "empty", "no_config"])
def test_invalid_repository(tmp_path, kind):
    repo = tmp_path / "repo"
    if kind != "missing":
        repo.mkdir()
    if kind == "no_config":
        (repo / "model" / "1").mkdir(parents=True)
    with pytest.raises(LaunchError, match=r"model repository .* is invalid"):
        TritonServer(repo, **ports()).start()


def test_model_import_error_shows_traceback(tmp_path):
    repo = make_repo(tmp_path, extra='raise RuntimeError("model import exploded: xyzzy")')
    server = TritonServer(repo, log_path=tmp_path / "triton.log", **ports())
    with pytest.raises(LaunchError, match="model import exploded: xyzzy") as err:
        server.start(timeout=120)
    assert "exited with code" in str(err.value)
    assert server.process is None


def _cli_env():
    # Make the package importable in the child even when it is not installed.
    src = str(Path(__file__).resolve().parents[1] / "python_backends")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}


def test_cli_serve_taken_port_fails_cleanly(tmp_path):
    repo = make_repo(tmp_path)
    p = ports()
    with socket.socket() as s:
        s.bind(("", p["http_port"]))
        s.listen()
        r = subprocess.run([sys.executable, "-m", "cosine.cli", "serve", "--model-repository", str(repo),
                            "--http-port", str(p["http_port"]), "--grpc-port", str(p["grpc_port"]),
                            "--metrics-port", str(p["metrics_port"])],
                           capture_output=True, text=True, timeout=60, env=_cli_env())
    assert r.returncode != 0
    assert f"http port {p['http_port']} is already in use" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_serve_runs_until_sigterm(tmp_path):
    repo = make_repo(tmp_path)
    p = ports()
    proc = subprocess.Popen([sys.executable, "-m", "cosine.cli", "serve", "--model-repository", str(repo),
                             "--http-port", str(p["http_port"]), "--grpc-port", str(p["grpc_port"]),
                             "--metrics-port", str(p["metrics_port"]), "--log-file", str(tmp_path / "t.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_cli_env())
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C" in line:
                break
        out = "".join(lines)
        assert f"127.0.0.1:{p['http_port']}" in out and str(tmp_path / "t.log") in out
        assert httpclient.InferenceServerClient(f"127.0.0.1:{p['http_port']}").is_server_ready()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not port_in_use(p["http_port"])


def test_an_activated_virtualenv_is_hidden_from_the_stub(tmp_path):
    from cosine.launcher import stub_environment

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /somewhere/else\n")
    env = stub_environment({"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin", "VIRTUAL_ENV": str(venv), "X": "1"})
    assert env["PATH"] == "/usr/bin:/usr/local/bin" and "VIRTUAL_ENV" not in env and env["X"] == "1"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"

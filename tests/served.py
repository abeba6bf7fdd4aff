"""A test deployment served through a real tritonserver, and the HTTP calls the tests make to it. No pytest here:
`make gpu-serve-check` runs on a machine that has only torch, transformers and the Triton wheels."""
import json
import shutil
import time
import urllib.request
from pathlib import Path

from cosine.contract import METRICS_FLUSH_S
from cosine.deploy.repository import write_repository
from cosine.deploy.spec import parse_spec
from cosine.launcher import TritonServer, free_ports

# Test servers stop after at most this long: Triton otherwise waits its full exit timeout (5 s) on the idle
# keep-alive connections that the tests' clients leave open, at every fixture's teardown.
FIXTURE_EXIT_TIMEOUT_S = 1


def drop_text_models(repository: Path) -> Path:
    """Without the clients' tokenizer models (the generation loop does not call them): two model processes fewer
    to start, for servers whose tests do not use them."""
    for unused in ("preprocessing", "postprocessing"):
        shutil.rmtree(repository / unused)
    return repository


def start_server(spec_raw: dict, root: Path, env: dict | None = None, text_models: bool = True) -> TritonServer:
    spec = parse_spec(spec_raw, root)
    repository = write_repository(spec, root / "repository")
    if not text_models:
        drop_text_models(repository)
    server = TritonServer(repository, *free_ports(3), log_path=root / "tritonserver.log",
                          env=env, exit_timeout=FIXTURE_EXIT_TIMEOUT_S)
    return server.start(timeout=300)



def post(server, path, body):
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/cosine/{path}", json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read().decode()


def generate(server, **body):
    return json.loads(post(server, "generate", body))


def as_list(value):
    return value if isinstance(value, list) else [value]


def metric(server, name, settled=True, **labels):
    """settled: after the updates made so far have reached the endpoint (else as it is: for polling)."""
    if settled:
        time.sleep(3 * METRICS_FLUSH_S)
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total

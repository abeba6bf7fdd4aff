import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from served import start_server  # noqa: E402
from tiny_models import make_checkpoint, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    make_tokenizer(root / "tokenizer")
    make_checkpoint(root / "llama", root / "tokenizer", "llama", seed=0)
    make_checkpoint(root / "unrelated", root / "tokenizer", "llama", seed=5, hidden_size=32, layers=1)
    return root


@pytest.fixture(scope="session")
def llama(tiny_dir) -> Path:
    return tiny_dir / "llama"


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    """The demo zoo's `tiny` profile (built once per session, under a minute)."""
    from cosine.zoo import build_zoo

    root = tmp_path_factory.mktemp("zoo")
    build_zoo(root, profile="tiny", progress=False)
    return root


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_dir, llama):
    root = tmp_path_factory.mktemp("server")
    engine = {"kv_cache_tokens": 8192, "num_threads": 1, "idle_timeout_s": 30}
    spec = {"target": dict(engine, checkpoint=str(llama)),
            # the target's own checkpoint drafts perfectly (inside the `cosine` process, as a drafter may); an
            # unrelated random model almost never
            "drafters": {"itself": dict(engine, checkpoint=str(llama), in_cosine_process=True),
                         "unrelated": dict(engine, checkpoint=str(tiny_dir / "unrelated")),
                         # a KV budget too small for any request: every call to it fails
                         "broken": dict(engine, checkpoint=str(tiny_dir / "unrelated"), kv_cache_tokens=32)},
            # every round drafts in the `cosine` process or the drafters' models (test_speculation_server.py has
            # a server with rounds in the target)
            "speculation_mode": "autoregressive", "target_rounds": 0}
    server = start_server(spec, root)
    yield server
    server.stop()

"""Deployment specs: invalid ones are refused naming the field; valid ones render a repository."""
import json

import pytest

from cosine.deploy.repository import write_repository
from cosine.deploy.spec import SpecError, dump_spec, load_spec, parse_spec


@pytest.mark.parametrize("raw,field", [
    ({}, "target"),
    ({"target": {}}, "target.checkpoint"),
    ({"target": {"checkpoint": "missing"}}, "target.checkpoint"),
    ({"target": {"checkpoint": "llama", "kv_cache_tokens": -1}}, "target.kv_cache_tokens"),
    ({"target": {"checkpoint": "llama", "device": "tpu"}}, "target.device"),
    ({"target": {"checkpoint": "llama", "colour": "red"}}, "target.colour"),
    ({"target": {"checkpoint": "llama"}, "drafters": {"a-b": {"checkpoint": "llama"}}}, "drafters.a-b"),
    ({"target": {"checkpoint": "llama"}, "http_port": 8001}, "http_port"),
    ({"target": {"checkpoint": "llama"}, "speed": 3}, "speed"),
    ({"target": {"checkpoint": "llama"}, "adaptive_draft_tokens": 0}, "adaptive_draft_tokens"),
    ({"target": {"checkpoint": "llama"}, "max_inflight_requests": 0}, "max_inflight_requests"),
    ({"target": {"checkpoint": "llama"}, "max_queued_tokens": "many"}, "max_queued_tokens"),
    ({"target": {"checkpoint": "llama"}, "queue_timeout_s": -1}, "queue_timeout_s"),
    ({"target": {"checkpoint": "llama"}, "drafters": {"a": {"checkpoint": "llama", "node": "b"}}}, "drafters.a.node"),
    ({"target": {"checkpoint": "llama", "node": "b"}, "nodes": {"b": {"url": "h:1"}}}, "target.node"),
    ({"target": {"checkpoint": "llama"}, "nodes": {"b": {"url": "8001"}}}, "nodes.b.url"),
    ({"target": {"checkpoint": "llama"}, "nodes": {"main": {"url": "h:1"}}}, "nodes"),
    ({"target": {"checkpoint": "llama"}, "drafter_timeout_s": 0}, "drafter_timeout_s"),
])
def test_invalid_specs_name_the_field(tiny_dir, raw, field):
    with pytest.raises(SpecError) as caught:
        parse_spec(raw, tiny_dir)
    assert str(caught.value).startswith(field)


def assert_round_trips(spec, tmp_path):
    dump_spec(spec, tmp_path / "deployment.yaml")
    assert load_spec(tmp_path / "deployment.yaml") == spec


def test_spec_round_trips_and_renders_a_repository(tiny_dir, tmp_path):
    spec = parse_spec({"target": {"checkpoint": "llama", "kv_cache_tokens": 1234},
                       "drafters": {"code": {"checkpoint": "llama"}}}, tiny_dir)
    assert_round_trips(spec, tmp_path)
    repo = write_repository(spec, tmp_path / "repo", relative_paths=True)
    assert sorted(p.name for p in repo.iterdir()) == ["cosine", "drafter_code", "postprocessing", "preprocessing",
                                                      "router", "target"]
    target = (repo / "target" / "config.pbtxt").read_text()
    assert '"kv_cache_tokens" value: { string_value: "1234" }' in target
    assert "allow_ragged_batch: true" in target
    assert "decoupled: true" in (repo / "cosine" / "config.pbtxt").read_text()
    assert (repo / "drafter_code" / "1" / "model.py").read_text() == (repo / "target" / "1" / "model.py").read_text()
    without_drafters = parse_spec({"target": {"checkpoint": "llama"}}, tiny_dir)
    write_repository(without_drafters, repo)
    assert not (repo / "drafter_code").exists()


def test_each_node_gets_its_own_repository(tiny_dir, tmp_path):
    """The main node serves everything but the other nodes' drafters, and calls those at the node's url; a drafter
    node serves its drafters only."""
    spec = parse_spec({"target": {"checkpoint": "llama"}, "nodes": {"edge": {"url": "10.0.0.2:9001"}},
                       "drafters": {"code": {"checkpoint": "llama", "node": "edge"}, "math": {"checkpoint": "llama"},
                                    "chat": {"checkpoint": "llama", "node": "edge"}},
                       "drafter_timeout_s": 2.5}, tiny_dir)
    assert_round_trips(spec, tmp_path)
    main = write_repository(spec, tmp_path / "main")
    assert sorted(p.name for p in main.iterdir()) == ["cosine", "drafter_math", "postprocessing", "preprocessing",
                                                      "router", "target"]
    cosine = (main / "cosine" / "config.pbtxt").read_text()
    assert '"remote_drafters" value: { string_value: "code=10.0.0.2:9001,chat=10.0.0.2:9001" }' in cosine
    assert '"drafter_timeout_s" value: { string_value: "2.5" }' in cosine
    assert '"drafters" value: { string_value: "code,math,chat" }' in (main / "router" / "config.pbtxt").read_text()
    edge = write_repository(spec, tmp_path / "edge", node="edge")
    assert sorted(p.name for p in edge.iterdir()) == ["drafter_chat", "drafter_code"]
    with pytest.raises(SpecError, match="node"):
        write_repository(spec, tmp_path / "other", node="other")


@pytest.mark.parametrize("eos,expected", [(7, "7"), ([7], "7"), ([7, 8, 9], ""), ([], "")])
def test_end_id_from_the_checkpoint(tmp_path, eos, expected):
    """Several EOS ids ("" : the cosine model takes the tokenizer's, which ends a chat turn), one, or none."""
    from cosine.deploy.repository import _end_id

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    assert _end_id(tmp_path) == expected

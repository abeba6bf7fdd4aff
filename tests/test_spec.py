"""Deployment specs: invalid ones are refused naming the field; valid ones render a repository."""
import json

import pytest

from cosine.deploy.repository import write_repository
from cosine.contract import engine_of, target_model_names
from cosine.deploy.spec import SpecError, default_replicas, dump_spec, load_spec, parse_spec

TARGETS = target_model_names(default_replicas("cpu"))  # this machine's default: one per core, up to 2


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
    ({"target": {"checkpoint": "llama"}, "plain_decode_steps_alone": 0}, "plain_decode_steps_alone"),
    ({"target": {"checkpoint": "llama"}, "max_inflight_requests": 0}, "max_inflight_requests"),
    ({"target": {"checkpoint": "llama"}, "max_queued_tokens": "many"}, "max_queued_tokens"),
    ({"target": {"checkpoint": "llama"}, "queue_timeout_s": -1}, "queue_timeout_s"),
    ({"target": {"checkpoint": "llama"}, "drafters": {"a": {"checkpoint": "llama", "node": "b"}}}, "drafters.a.node"),
    ({"target": {"checkpoint": "llama", "node": "b"}, "nodes": {"b": {"url": "h:1"}}}, "target.node"),
    ({"target": {"checkpoint": "llama"}, "nodes": {"b": {"url": "8001"}}}, "nodes.b.url"),
    ({"target": {"checkpoint": "llama"}, "nodes": {"main": {"url": "h:1"}}}, "nodes"),
    ({"target": {"checkpoint": "llama"}, "drafter_timeout_s": 0}, "drafter_timeout_s"),
    ({"target": {"checkpoint": "llama", "replicas": 0}}, "target.replicas"),
    ({"target": {"checkpoint": "llama"}, "plain_decode_lookahead": "yes"}, "plain_decode_lookahead"),
    ({"target": {"checkpoint": "llama"}, "drafters": {"a": {"checkpoint": "llama", "replicas": 2}}},
     "drafters.a.replicas"),
    ({"target": {"checkpoint": "llama", "in_cosine_process": True}}, "target.in_cosine_process"),
    ({"target": {"checkpoint": "llama"}, "drafters": {"a": {"checkpoint": "llama", "in_cosine_process": "yes"}}},
     "drafters.a.in_cosine_process"),
    ({"target": {"checkpoint": "llama"}, "nodes": {"b": {"url": "h:1"}},
      "drafters": {"a": {"checkpoint": "llama", "node": "b", "in_cosine_process": True}}},
     "drafters.a.in_cosine_process"),
    ({"target": {"checkpoint": "llama"}, "drafters": {"a": {"checkpoint": "llama", "device": "gpu",
                                                            "in_cosine_process": True}}},
     "drafters.a.in_cosine_process"),
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
    assert sorted(p.name for p in repo.iterdir()) == sorted(["cosine", "drafter_code", "postprocessing",
                                                             "preprocessing", "router", *TARGETS])
    target = (repo / "target" / "config.pbtxt").read_text()
    assert '"kv_cache_tokens" value: { string_value: "1234" }' in target
    # the target's plain decoding looks ahead (serving.lookahead) unless the spec says not; drafters never do
    assert '"lookahead" value: { string_value: "1" }' in target
    assert '"lookahead" value: { string_value: "0" }' in (repo / "drafter_code" / "config.pbtxt").read_text()
    assert "allow_ragged_batch: true" in target
    assert "decoupled: true" in (repo / "cosine" / "config.pbtxt").read_text()
    assert (repo / "drafter_code" / "1" / "model.py").read_text() == (repo / "target" / "1" / "model.py").read_text()
    without_drafters = parse_spec({"target": {"checkpoint": "llama"}, "plain_decode_lookahead": False}, tiny_dir)
    assert_round_trips(without_drafters, tmp_path)
    write_repository(without_drafters, repo)
    assert not (repo / "drafter_code").exists()
    assert '"lookahead" value: { string_value: "0" }' in (repo / "target" / "config.pbtxt").read_text()


def test_a_drafter_in_the_cosine_process_is_no_model_but_the_cosine_models_parameters(tiny_dir, tmp_path):
    """Its engine parameters, as its own model would get them, go to the `cosine` model, which builds the engine;
    a drafter moved there leaves no stale model behind."""
    raw = {"target": {"checkpoint": "llama"},
           "drafters": {"code": {"checkpoint": "llama", "kv_cache_tokens": 512}, "math": {"checkpoint": "llama"}}}
    repo = write_repository(parse_spec(raw, tiny_dir), tmp_path / "repo")
    assert (repo / "drafter_code").exists()
    raw["drafters"]["code"]["in_cosine_process"] = True
    spec = parse_spec(raw, tiny_dir)
    assert_round_trips(spec, tmp_path)
    write_repository(spec, repo)
    assert not (repo / "drafter_code").exists() and (repo / "drafter_math").exists()
    cosine = (repo / "cosine" / "config.pbtxt").read_text()
    assert '"in_process_drafters" value: { string_value: "code" }' in cosine
    assert '"drafter_code.kv_cache_tokens" value: { string_value: "512" }' in cosine
    assert '"drafter_code.num_threads" value: { string_value: "1" }' in cosine
    assert "drafter_math.kv_cache_tokens" not in cosine
    assert "drafter_code=" not in cosine and "drafter_math=portable" in cosine  # engine_kinds: the Triton models
    assert '"drafters" value: { string_value: "code,math" }' in cosine  # routed by name as any other


def test_each_target_replica_is_a_model_of_its_own(tiny_dir, tmp_path):
    """replicas: N target models (the cosine model spreads sequences over them), each told N so that it takes its
    share of the cores; fewer replicas later leave no stale model behind."""
    spec = parse_spec({"target": {"checkpoint": "llama", "replicas": 3}}, tiny_dir)
    assert_round_trips(spec, tmp_path)
    repo = write_repository(spec, tmp_path / "repo")
    assert sorted(p.name for p in repo.iterdir() if p.name.startswith("target")) == ["target", "target_1", "target_2"]
    cosine = (repo / "cosine" / "config.pbtxt").read_text()
    assert '"target_model" value: { string_value: "target,target_1,target_2" }' in cosine
    assert "target_2=portable" in cosine
    for name in ("target", "target_1", "target_2"):
        config = (repo / name / "config.pbtxt").read_text()
        assert f'name: "{name}"' in config and '"replicas" value: { string_value: "3" }' in config
        assert engine_of(name) == "target"
    assert engine_of("drafter_code") == "drafter_code"
    write_repository(parse_spec({"target": {"checkpoint": "llama", "replicas": 1}}, tiny_dir), repo)
    assert sorted(p.name for p in repo.iterdir() if p.name.startswith("target")) == ["target"]
    assert default_replicas("gpu") == 1


def test_each_node_gets_its_own_repository(tiny_dir, tmp_path):
    """The main node serves everything but the other nodes' drafters, and calls those at the node's url; a drafter
    node serves its drafters only."""
    spec = parse_spec({"target": {"checkpoint": "llama"}, "nodes": {"edge": {"url": "10.0.0.2:9001"}},
                       "drafters": {"code": {"checkpoint": "llama", "node": "edge"}, "math": {"checkpoint": "llama"},
                                    "chat": {"checkpoint": "llama", "node": "edge"}},
                       "drafter_timeout_s": 2.5}, tiny_dir)
    assert_round_trips(spec, tmp_path)
    main = write_repository(spec, tmp_path / "main")
    assert sorted(p.name for p in main.iterdir()) == sorted(["cosine", "drafter_math", "postprocessing",
                                                             "preprocessing", "router", *TARGETS])
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

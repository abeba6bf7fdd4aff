"""build_engines.py as a user runs it: the tiny zoo becomes a repository a real tritonserver serves; routing works
after warm-up (judged by measured acceptance); drafters with another tokenizer are refused."""
import json
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from served import FIXTURE_EXIT_TIMEOUT_S, as_list, generate, metric

from cosine.contract import target_model_names
from cosine.deploy.spec import default_replicas
from cosine.launcher import TritonServer, free_ports

ROOT = Path(__file__).resolve().parents[1]


def build_engines(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "build_engines.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def zoo_server(tiny_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo-deployment")
    done = build_engines("--demo", "--profile", "tiny", "--zoo-dir", tiny_zoo, "--out-spec", root / "spec.yaml",
                         "--repository", root / "repository")
    assert done.returncode == 0, done.stderr
    server = TritonServer(root / "repository", *free_ports(3), log_path=root / "server.log",
                          exit_timeout=FIXTURE_EXIT_TIMEOUT_S)
    server.start(timeout=300)
    yield server
    server.stop()


def held_out(tiny_zoo, max_tokens=12):
    """The held-out prompts that leave room for max_tokens in the tiny target's context."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo / "tokenizer")
    context = json.loads((tiny_zoo / "target" / "config.json").read_text())["max_position_embeddings"]
    rows = [json.loads(line) for line in (tiny_zoo / "prompts" / "mixed.jsonl").read_text().splitlines()]
    return [(row["prompt"], row["domain"]) for row in rows
            if len(tokenizer.encode(row["prompt"])) + max_tokens <= context]


def test_the_generated_repository_serves_every_mode_exactly(zoo_server, tiny_zoo):
    prompt = held_out(tiny_zoo)[0][0]
    outputs = {mode: as_list(generate(zoo_server, text_input=prompt, max_tokens=12,
                                      speculation_mode=mode)["output_ids"])
               for mode in ("autoregressive", "vanilla", "specinfer", "cosine")}
    assert len(set(map(tuple, outputs.values()))) == 1 and len(outputs["cosine"]) > 0


def test_router_picks_drafters_that_draft_well_after_warm_up(zoo_server, tiny_zoo):
    """The router's objective is acceptance. Measured per prompt with each drafter alone (vanilla), its first choices
    after warm-up must draft better than chance (a drafter at random) and no worse than routing every prompt to its
    domain's specialist. The tiny zoo's drafters are barely trained: a specialist is not always the best drafter of
    its own domain here, which is what verification feedback teaches the router."""
    prompts = held_out(tiny_zoo, max_tokens=16)
    assert len(prompts) >= 12
    drafters = sorted(path.name for path in (tiny_zoo / "drafters").iterdir())

    def acceptance(prompt, drafter):
        rounds, drafted, accepted = generate(zoo_server, text_input=prompt, max_tokens=16, return_stats=True,
                                             speculation_mode="vanilla", drafters=[drafter],
                                             num_draft_tokens=4)["speculation_stats"]
        return accepted / max(drafted, 1)
    pairs = [(prompt, drafter) for prompt, _ in prompts for drafter in drafters]
    with ThreadPoolExecutor(4) as pool:  # greedy vanilla: each pair's acceptance is the same whatever runs beside it
        measured = dict(zip(pairs, pool.map(lambda pair: acceptance(*pair), pairs)))
    # fixed length: an adaptive request may decode plainly, unrouted, in a window where speculation is off
    routed = dict(speculation_mode="cosine", adaptive_draft_length=False)
    for prompt, _ in prompts * 2:  # warm-up: verification feedback reaches the router
        generate(zoo_server, text_input=prompt, max_tokens=8, **routed)
    picks = {prompt: as_list(generate(zoo_server, text_input=prompt, max_tokens=4, return_stats=True,
                                      **routed)["routed_drafters"])[0] for prompt, _ in prompts}
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    routed_rate = mean([measured[prompt, picks[prompt]] for prompt, _ in prompts])
    specialist_rate = mean([measured[prompt, domain] for prompt, domain in prompts])
    chance_rate = mean(list(measured.values()))
    print(f"\nacceptance per draft token: routed {routed_rate:.2f}, specialists {specialist_rate:.2f}, "
          f"chance {chance_rate:.2f}; picks {Counter((d, picks[p]) for p, d in prompts)}")
    assert routed_rate >= chance_rate + 0.02 and routed_rate >= specialist_rate - 0.05


def test_the_router_learns_to_route_prompts_without_the_drafters_scoring_them(zoo_server, tiny_zoo):
    """Once its classifier's predictions of the drafters' verdicts have been right over a window of scored prompts,
    the router routes a request from the prompt's tokens alone (cosine_router_routes_total{by="prompt_classifier"}),
    still having one in eight scored; outputs stay the target's own."""
    prompts = [prompt for prompt, _ in held_out(tiny_zoo, max_tokens=4)]
    routed = dict(speculation_mode="cosine", adaptive_draft_length=False, max_tokens=4)
    expected = {prompt: as_list(generate(zoo_server, text_input=prompt, max_tokens=4,
                                         speculation_mode="autoregressive")["output_ids"]) for prompt in prompts}

    def classified() -> float:
        return metric(zoo_server, "cosine_router_routes_total", by="prompt_classifier")
    before, sent = classified(), 0
    with ThreadPoolExecutor(2) as pool:  # two at a time: not busy, so each request is routed as it starts
        while sent < 480 and classified() == before:  # a fresh server: about 120-160
            batch = prompts * 2
            outputs = list(pool.map(lambda p: as_list(generate(zoo_server, text_input=p, **routed)["output_ids"]),
                                    batch))
            assert outputs == [expected[prompt] for prompt in batch]
            sent += len(batch)
    print(f"\nrouted from the prompt alone after {sent} requests")
    assert classified() > before
    # the ablation: with classify_prompt false the drafters score the prompt, however sure the classifier is
    counts = lambda: (classified(), metric(zoo_server, "cosine_router_routes_total", by="likelihood"))  # noqa: E731
    before = counts()
    out = generate(zoo_server, text_input=prompts[0], classify_prompt=False, **routed)
    assert as_list(out["output_ids"]) == expected[prompts[0]] and counts() == (before[0], before[1] + 1)


def test_a_drafter_with_another_tokenizer_is_refused(tiny_zoo, tmp_path):
    drafter = tmp_path / "odd-drafter"
    shutil.copytree(tiny_zoo / "drafters" / "code", drafter)
    tokenizer = json.loads((drafter / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["zzz-extra"] = len(tokenizer["model"]["vocab"])
    (drafter / "tokenizer.json").write_text(json.dumps(tokenizer))
    done = build_engines("--target", tiny_zoo / "target", "--drafter", f"odd={drafter}",
                         "--out-spec", tmp_path / "spec.yaml", "--repository", tmp_path / "repository")
    assert done.returncode == 2
    assert "odd" in done.stderr and "tokenizer.json" in done.stderr
    assert not (tmp_path / "repository").exists()


def test_user_checkpoints_make_a_deployment(tiny_zoo, tmp_path):
    done = build_engines("--target", tiny_zoo / "target", "--drafter", f"code={tiny_zoo / 'drafters' / 'code'}",
                         "--out-spec", tmp_path / "spec.yaml", "--repository", tmp_path / "repository")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "repository").iterdir()) == sorted([
        "cosine", "drafter_code", "postprocessing", "preprocessing", "router",
        *target_model_names(default_replicas("cpu"))])


def test_each_node_of_a_multi_node_spec_gets_its_repository(llama, tmp_path):
    (tmp_path / "spec.yaml").write_text(f"target: {{checkpoint: {llama}}}\nnodes: {{edge: {{url: '10.0.0.2:8001'}}}}\n"
                                        f"drafters: {{code: {{checkpoint: {llama}, node: edge}}}}\n")
    done = build_engines("--spec", tmp_path / "spec.yaml", "--node", "edge", "--repository", tmp_path / "edge")
    assert done.returncode == 0, done.stderr
    assert [p.name for p in (tmp_path / "edge").iterdir()] == ["drafter_code"]
    done = build_engines("--spec", tmp_path / "spec.yaml", "--node", "nowhere", "--repository", tmp_path / "x")
    assert done.returncode == 2 and "nowhere" in done.stderr
    assert not (tmp_path / "x").exists()

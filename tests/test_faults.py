"""Faults, overload and the trust boundary, end to end through one real tritonserver (tiny models).

Order matters only for time: the stub-killing tests come last, each waits until its model is restored."""
import json
import os
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import pytest
import tritonclient.http as httpclient
from served import as_list, generate, metric, start_server
from test_server import wait_for
from tiny_models import PROMPTS, make_checkpoint
from tritonclient.utils import InferenceServerException

from cosine.contract import DEPLOYMENT_SECRET, DEPLOYMENT_SECRET_ENV
from cosine.engine.engine import Admission, StepRequest
from cosine.engine.sampling import SamplingParams
from cosine.launcher import SERVER_RESTORE, stub_processes
from cosine.serving import wire

SECRET = "test-deployment-secret"
# queue_timeout_s: long enough that on a slow machine the requests waiting for KV cache in the limits test are
# served, not timed out (at 3 s, a slow phase once served 9 of its 15 expected requests)
LIMITS = dict(max_inflight_requests=10, max_queued_tokens=400, max_queued_requests=8, queue_timeout_s=6)
TARGET_KV = 2048  # small: a few requests fill it, so admission waits and the queue limits are reached


@pytest.fixture(scope="module")
def faults_server(tmp_path_factory, tiny_dir, llama):
    root = tmp_path_factory.mktemp("faults")
    engine = {"num_threads": 1, "idle_timeout_s": 30}
    # one replica: these tests fill one target's KV budget and kill its one process
    spec = dict(LIMITS, target=dict(engine, checkpoint=str(llama), kv_cache_tokens=TARGET_KV, replicas=1),
                drafters={"itself": dict(engine, checkpoint=str(llama), kv_cache_tokens=8192)},
                speculation_mode="vanilla", target_rounds=0)  # the drafters' own models draft every round
    server = start_server(spec, root, env={DEPLOYMENT_SECRET_ENV: SECRET}, text_models=False)
    yield server
    server.stop()


def http_status(server, path, body=None, timeout=120):
    """(status, parsed JSON body or None) of a GET (body None) or POST."""
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://{server.http_url}{path}", data),
                                    timeout=timeout) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as error:
        text = error.read()
        return error.code, json.loads(text) if text else None


def ready(server) -> bool:
    try:
        return http_status(server, "/v2/health/ready", timeout=10)[0] == 200
    except OSError:  # the server is being restarted
        return False


def engine_call(server, model, steps, secret=SECRET):
    """A direct call to an engine model, as an outside client could make one (secret=None: without it)."""
    arrays = wire.pack_steps(steps)
    if secret is not None:
        arrays[DEPLOYMENT_SECRET] = np.array([secret.encode()], np.object_)
    datatypes = {np.int32: "INT32", np.float32: "FP32", np.bool_: "BOOL", np.uint64: "UINT64", np.object_: "BYTES"}
    inputs = []
    for name, array in arrays.items():
        tensor = httpclient.InferInput(name, [1, len(array)], datatypes[array.dtype.type])
        tensor.set_data_from_numpy(array[None])
        inputs.append(tensor)
    with httpclient.InferenceServerClient(server.http_url) as client:
        result = client.infer(model, inputs)
    return [kind.decode() for kind in result.as_numpy("result_errors").reshape(-1, 2)[:, 0]]


def hold(sequence_id, max_new_tokens=255) -> StepRequest:
    return StepRequest(sequence_id, [1], admission=Admission(max_new_tokens, SamplingParams()))


def kill_stub(server, model) -> float:
    stub = next(pid for pid, name in stub_processes(server.process.pid).items() if name == model)
    os.kill(stub, signal.SIGKILL)
    return time.monotonic()


def restored(server, model) -> str:
    """Waits until the watchdog restored the model, or restarted the whole server: Triton 2.51 sometimes aborts
    while it restores a model whose stub was killed under load (see cosine.launcher.StubWatchdog)."""
    assert wait_for(lambda: server.restores[model] or server.restores[SERVER_RESTORE], timeout=180)
    if server.restores[SERVER_RESTORE]:
        print(f"\nTriton aborted while restoring {model}; the watchdog restarted it")
        assert wait_for(lambda: ready(server), timeout=180)
        return SERVER_RESTORE
    return model


def sent_until_seen(send, state, attempts=10) -> list:
    """Sends a batch of requests (send() -> their futures) until `state()` is seen while one is in flight, and
    returns that batch's futures. The state is polled without a pause (`state` reads the metrics unsettled), and a
    batch that ends unseen is sent again: on a fast machine a batch lasts a fraction of a second. Each batch first
    waits until the state is gone (the metrics are flushed every METRICS_FLUSH_S), so that a state seen is the
    new batch's, not the last one's."""
    for _ in range(attempts):
        assert wait_for(lambda: not state(), timeout=10)
        running = send()
        while not all(future.done() for future in running):
            if state():
                return running
        wait(running)
    raise AssertionError(f"no batch of {attempts} was seen in that state")


def wait_for_s(predicate, since, timeout=10) -> float:
    """Seconds from `since` until the predicate held (polled quickly: some states last seconds only)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return time.monotonic() - since


def test_outside_calls_to_internal_models_are_refused(faults_server):
    reserved = metric(faults_server, "cosine_kv_cache_reserved_tokens", model="target")
    for secret in (None, "guessed"):
        with pytest.raises(InferenceServerException, match=DEPLOYMENT_SECRET) as refused:
            engine_call(faults_server, "target", [hold(7)], secret)
        assert refused.value.status() == "400"
        feedback = {"inputs": [
            {"name": "feedback_context", "shape": [1, 1], "datatype": "BYTES", "data": ["dialogue"]},
            {"name": "feedback_drafters", "shape": [1, 1], "datatype": "BYTES", "data": ["itself"]},
            {"name": "feedback_matches", "shape": [1, 1], "datatype": "FP32", "data": [0.0]},
            {"name": "feedback_trials", "shape": [1, 1], "datatype": "FP32", "data": [100.0]}]}
        if secret:
            feedback["inputs"].append({"name": DEPLOYMENT_SECRET, "shape": [1, 1], "datatype": "BYTES",
                                       "data": [secret]})
        status, body = http_status(faults_server, "/v2/models/router/infer", feedback)
        assert status == 400 and DEPLOYMENT_SECRET in body["error"]
    assert metric(faults_server, "cosine_kv_cache_reserved_tokens", model="target") == reserved
    # the secret is in no model's configuration
    for model in ("cosine", "target", "router", "drafter_itself"):
        assert SECRET not in json.dumps(http_status(faults_server, f"/v2/models/{model}/config")[1])
    # the watchdog's repository API is closed to clients too
    assert http_status(faults_server, "/v2/repository/models/target/unload", {})[0] == 403
    assert ready(faults_server)


def test_queued_request_times_out_with_a_clear_error_then_serves(faults_server):
    held = [hold(100 + i) for i in range(6)]  # 6 x 320 of the target's 2048 KV tokens
    assert engine_call(faults_server, "target", held) == [""] * len(held)
    started = time.monotonic()
    status, body = http_status(faults_server, "/v2/models/cosine/generate",
                               dict(text_input=PROMPTS[0], max_tokens=60))  # needs > the 128 tokens left
    waited = time.monotonic() - started
    assert status != 200 and "queue_timeout_s" in body["error"], body
    assert LIMITS["queue_timeout_s"] - 0.5 < waited < LIMITS["queue_timeout_s"] + 30
    engine_call(faults_server, "target", [StepRequest(step.sequence_id, release=True) for step in held])
    assert generate(faults_server, text_input=PROMPTS[0], max_tokens=30)["sequence_length"] == 30
    assert metric(faults_server, "cosine_queue_seconds_bucket", le="+Inf") >= 1


def test_beyond_the_limits_requests_are_refused_cleanly(faults_server):
    body = dict(text_input=PROMPTS[1], max_tokens=200, speculation_mode="autoregressive")  # 7 fit in the KV cache
    expected = as_list(generate(faults_server, **body)["output_ids"])
    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda _: http_status(faults_server, "/v2/models/cosine/generate", body),
                                range(40)))
    served = [answer for status, answer in answers if status == 200]
    refused = [(status, answer["error"]) for status, answer in answers if status != 200]
    assert all(as_list(answer["output_ids"]) == expected for answer in served)  # accepted: complete
    # Triton's queue and the model's share are served, not the rest. The model's share is at most a KV cache's worth
    # (7) plus max_queued_tokens waiting; how much of it the burst fills first depends on how the dynamic batcher
    # hands the burst over (a fresh-clone CI run served 14, others 15 or more), so the bound asks for some of it
    assert LIMITS["max_queued_requests"] < len(served) < len(answers)
    assert refused and all(status == 503 and "Exceeds maximum queue size" in error for status, error in refused), \
        refused
    assert wait_for(lambda: metric(faults_server, "cosine_kv_cache_reserved_tokens", model="target") == 0)
    assert metric(faults_server, "cosine_inflight_requests") == 0
    assert metric(faults_server, "nv_inference_pending_request_count", model="cosine") == 0
    assert ready(faults_server)
    assert as_list(generate(faults_server, **body)["output_ids"]) == expected


def test_killed_drafter_is_restored_and_used_again(faults_server):
    # no end token: every request runs its 200 tokens (even so a batch lasts about 0.3 s on a fast machine)
    body = dict(max_tokens=200, end_id=-1, return_stats=True)
    with ThreadPoolExecutor(8) as pool:
        expected = dict(zip(PROMPTS, pool.map(lambda p: as_list(generate(faults_server, text_input=p, **body)
                                                                ["output_ids"]), PROMPTS)))
        running = sent_until_seen(
            lambda: [pool.submit(generate, faults_server, text_input=p, **body) for p in PROMPTS],
            lambda: metric(faults_server, "cosine_active_sequences", settled=False, model="drafter_itself") >= 4)
        killed = kill_stub(faults_server, "drafter_itself")
        failures = [future.exception() for future in running]
    if restored(faults_server, "drafter_itself") != SERVER_RESTORE:  # else requests in flight failed with it
        assert failures == [None] * len(PROMPTS)  # 0 failed requests
        answers = [future.result() for future in running]
        assert [as_list(a["output_ids"]) for a in answers] == [expected[p] for p in PROMPTS]
        restored_s = time.monotonic() - killed
        print(f"\ndrafter restored {restored_s:.1f} s after kill -9")
    assert ready(faults_server)  # a drafter is not needed to serve
    drafted = generate(faults_server, text_input=PROMPTS[0], **body)["speculation_stats"][1]
    assert drafted > 0, "the restored drafter is not used"
    if not faults_server.restores[SERVER_RESTORE]:
        assert metric(faults_server, "cosine_model_restores_total", model="drafter_itself") == 1


def test_killed_target_fails_requests_fast_and_serves_after_restore(faults_server):
    # no end token: every request runs its 200 tokens, so that all are in flight together when the target dies
    body = dict(max_tokens=200, end_id=-1, speculation_mode="autoregressive")
    with ThreadPoolExecutor(8) as pool:
        running = sent_until_seen(
            lambda: [pool.submit(http_status, faults_server, "/v2/models/cosine/generate",
                                            dict(body, text_input=p)) for p in PROMPTS],
            lambda: metric(faults_server, "cosine_active_sequences", settled=False, model="target") >= 4)
        killed = kill_stub(faults_server, "target")
        wait(running)
    failed_s = time.monotonic() - killed
    not_ready_s = wait_for_s(lambda: not ready(faults_server), since=killed)
    if not faults_server.restores[SERVER_RESTORE]:
        answers = [future.result() for future in running]
        errors = [answer["error"] for status, answer in answers if status != 200]
        assert errors and all("target" in error for error in errors), errors
        assert failed_s < 5, f"in-flight requests took {failed_s:.1f} s to fail"
        assert not_ready_s < 5 and not faults_server.restores["target"], "readiness never went false"
        status, answer = http_status(faults_server, "/v2/models/cosine/generate", dict(body, text_input=PROMPTS[0]))
        assert status != 200 and "target" in answer["error"]  # at once, not after a wait
    assert wait_for(lambda: ready(faults_server), timeout=180)
    restored_s = time.monotonic() - killed
    if restored(faults_server, "target") != SERVER_RESTORE:
        assert metric(faults_server, "cosine_model_process_deaths_total", model="target") == 1
    assert generate(faults_server, text_input=PROMPTS[0], max_tokens=20)["sequence_length"] == 20
    print(f"\ntarget killed: requests failed within {failed_s:.1f} s, not ready after {not_ready_s:.1f} s, "
          f"ready again after {restored_s:.1f} s")


@pytest.fixture(scope="module")
def replicas_server(tmp_path_factory, tiny_dir):
    # a target slow enough that a batch's requests still run for a while after the metrics show them (flushed every
    # METRICS_FLUSH_S): on the tests' 2-layer model those on the killed replica had at times ended, and none failed
    root = tmp_path_factory.mktemp("replicas")
    slower = make_checkpoint(root / "slower", tiny_dir / "tokenizer", hidden_size=256, layers=4)
    spec = dict(target=dict(checkpoint=str(slower), num_threads=1, replicas=2), speculation_mode="autoregressive")
    server = start_server(spec, root, env={DEPLOYMENT_SECRET_ENV: SECRET}, text_models=False)
    yield server
    server.stop()


def test_a_killed_target_replica_is_restored_in_place_while_the_other_serves(replicas_server):
    """Only the sequences on the dead replica fail; the other replica's finish exactly, the server stays ready,
    new requests are served at once, and the restored replica takes sequences again."""
    server, body = replicas_server, dict(max_tokens=200, end_id=-1)  # no end token: every request runs 200 tokens
    with ThreadPoolExecutor(len(PROMPTS) * 2) as pool:  # one wave: the state is seen as it starts, not as it ends
        expected = dict(zip(PROMPTS, pool.map(lambda p: as_list(generate(server, text_input=p, **body)
                                                                ["output_ids"]), PROMPTS)))
        running = sent_until_seen(
            lambda: [pool.submit(http_status, server, "/v2/models/cosine/generate",
                                            dict(body, text_input=p)) for p in PROMPTS * 2],
            lambda: min(metric(server, "cosine_active_sequences", settled=False, model=m)
                        for m in ("target", "target_1")) >= 3)
        killed = kill_stub(server, "target_1")
        stayed_ready = []
        while not all(future.done() for future in running):
            stayed_ready.append(ready(server))
        try:
            status, answer = http_status(server, "/v2/models/cosine/generate", dict(body, text_input=PROMPTS[0]))
        except OSError:  # Triton aborted while restoring (checked next)
            status, answer = None, None
        served_during_restore = time.monotonic() - killed
    if restored(server, "target_1") == SERVER_RESTORE:
        return  # Triton aborted: everything in flight failed with it (see restored)
    answers = [(p, *future.result()) for p, future in zip(PROMPTS * 2, running)]
    failed = [answer["error"] for _, status, answer in answers if status != 200]
    finished = [(p, answer) for p, status, answer in answers if status == 200]
    assert failed and all("target_1" in error for error in failed), failed
    assert finished and all(as_list(answer["output_ids"]) == expected[p] for p, answer in finished)
    assert all(stayed_ready)
    assert status == 200 and as_list(answer["output_ids"]) == expected[PROMPTS[0]]
    before = metric(server, "cosine_engine_batches_total", model="target_1")
    with ThreadPoolExecutor(8) as pool:
        again = list(pool.map(lambda p: as_list(generate(server, text_input=p, **body)["output_ids"]), PROMPTS * 2))
    assert again == [expected[p] for p in PROMPTS * 2]
    assert metric(server, "cosine_engine_batches_total", model="target_1") > before, "the restored replica idles"
    print(f"\ntarget_1 killed: {len(failed)} of {len(answers)} requests failed; a new request, sent once they "
          f"ended, served by {served_during_restore:.1f} s after the kill")


def test_killed_router_comes_back_with_what_it_learned(faults_server):
    """The router's evidence and its prompt classifier outlive its process: the watchdog restores the router in the
    same server and the new process takes them back, where it used to start again from the prior and score every
    prompt until the classifier had learnt again."""
    secret = {"name": DEPLOYMENT_SECRET, "shape": [1, 1], "datatype": "BYTES", "data": [SECRET]}
    drafter = {"name": "drafter_names", "shape": [1, 1], "datatype": "BYTES", "data": ["itself"]}
    one_drafter = {"name": "max_drafters", "shape": [1, 1], "datatype": "INT32", "data": [1]}
    prompt = {"name": "prompt_ids", "shape": [1, 3], "datatype": "INT32", "data": [5, 6, 7]}

    def router_call(*inputs):
        status, answer = http_status(faults_server, "/v2/models/router/infer", {"inputs": [*inputs, secret]})
        assert status == 200, answer
        return {output["name"]: output["data"] for output in answer["outputs"]}

    def acceptance():
        return router_call(drafter, {"name": "prompt_logprobs", "shape": [1, 1], "datatype": "FP32", "data": [-1.0]},
                           one_drafter)["acceptance"][0]

    def feedback(trials):  # the router writes its state down with every feedback
        router_call({"name": "feedback_context", "shape": [1, 1], "datatype": "BYTES", "data": ["itself"]},
                    {"name": "feedback_drafters", "shape": [1, 1], "datatype": "BYTES", "data": ["itself"]},
                    {"name": "feedback_matches", "shape": [1, 1], "datatype": "FP32", "data": [0.0]},
                    {"name": "feedback_trials", "shape": [1, 1], "datatype": "FP32", "data": [trials]})

    def classified(calls=16):
        """How many of these calls the classifier routed from the prompt alone (all but its one-in-8 checks)."""
        return sum(router_call(drafter, prompt, one_drafter)["cooperate"][0] > 0 for _ in range(calls))

    before = acceptance()
    feedback(100.0)
    learned = acceptance()
    assert learned < before - 0.1  # a drafter that never matched: its expected acceptance fell
    assert classified() == 0  # nothing learnt yet: every prompt must be scored
    for _ in range(40):  # prompts the drafters scored teach the classifier
        router_call(drafter, prompt, one_drafter,
                    {"name": "prompt_logprobs", "shape": [1, 1], "datatype": "FP32", "data": [-1.0]})
    feedback(0.0)  # a request that verified nothing: no evidence, but the state is written down
    assert classified() >= 8
    kill_stub(faults_server, "router")
    if restored(faults_server, "router") != SERVER_RESTORE:  # a restarted server starts afresh, by design
        assert acceptance() == pytest.approx(learned)
        assert classified() >= 8

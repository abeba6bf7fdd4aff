"""The admission gate in front of the `cosine` model (Triton-free): it holds the calling thread while the deployment
is at a limit and lets it in once there is room (end to end: tests/test_faults.py)."""
import asyncio
import threading

from cosine.serving.limits import AdmissionGate, Limits


def entering(gate: AdmissionGate) -> threading.Event:
    entered = threading.Event()
    threading.Thread(target=lambda: (gate.enter(), entered.set()), daemon=True).start()
    return entered


def test_gate_holds_a_request_beyond_max_inflight_until_one_leaves():
    gate = AdmissionGate(Limits(max_inflight_requests=2))
    gate.enter()
    gate.enter()
    held = entering(gate)
    assert not held.wait(0.3)
    gate.leave()
    assert held.wait(5) and gate.in_flight == 2


def test_gate_holds_new_requests_while_max_queued_tokens_wait_for_kv_cache():
    gate = AdmissionGate(Limits(max_inflight_requests=10, max_queued_tokens=100))
    gate.queue_tokens(60)
    gate.enter()  # under the limit: the request that crosses it is served
    gate.queue_tokens(60)
    held = entering(gate)
    assert not held.wait(0.3)
    gate.queue_tokens(-60)
    assert held.wait(5) and gate.in_flight == 2


def test_a_batch_enters_as_far_as_there_is_room_and_the_rest_waits_inside_up_to_the_timeout():
    gate = AdmissionGate(Limits(max_inflight_requests=3, queue_timeout_s=0.5))
    assert gate.enter(5) == 3
    assert not asyncio.run(gate.enter_later())  # timed out: still full
    gate.leave()
    assert asyncio.run(gate.enter_later()) and gate.in_flight == 3


def test_a_request_waiting_inside_is_woken_by_a_leave_on_another_thread():
    gate = AdmissionGate(Limits(max_inflight_requests=1, queue_timeout_s=30))
    gate.enter()
    threading.Timer(0.2, gate.leave).start()  # the execute thread of another batch

    async def wait():
        started = asyncio.get_running_loop().time()
        entered = await gate.enter_later()
        return entered, asyncio.get_running_loop().time() - started
    entered, waited = asyncio.run(wait())
    assert entered and gate.in_flight == 1
    assert 0.15 < waited < 5  # woken by the leave, long before the timeout

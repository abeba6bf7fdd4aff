"""`make gpu-serve-check`: a tiny deployment served through Triton with its engines on the GPU (`device: gpu`); per
mode, greedy output must equal transformers' generate on the same device, and sampled rounds in the target must
accept the target's own draft tokens. For a CUDA machine with torch and transformers (the project not installed):
nvidia-pytriton, tritonclient and python-rapidjson are all it needs besides, about 57 MB of wheels. On a CPU, after
`make venv`: `.venv/bin/python tests/gpu_serve_check.py cpu` (a test runs it: tests/test_gpu_check.py).
Not yet run on a GPU: the session that wrote it (15) was refused a second machine."""
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "python_backends"), str(REPO / "client"), str(REPO / "tests")]

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from served import as_list, generate, metric, start_server  # noqa: E402
from tiny_models import PROMPTS, make_checkpoint, make_tokenizer  # noqa: E402

from cosine_client.gpu_check import say, transformers_greedy  # noqa: E402


def main(device: str = "gpu") -> int:
    """device: the spec's engine device, gpu or cpu."""
    with tempfile.TemporaryDirectory(prefix="gpu-serve-") as tmp:
        return check(Path(tmp), device)


def check(root: Path, device: str) -> int:
    torch_device = "cuda" if device == "gpu" else "cpu"
    make_tokenizer(root / "tokenizer")
    make_checkpoint(root / "llama", root / "tokenizer", "llama", seed=0)
    engine = {"kv_cache_tokens": 8192, "num_threads": 1, "device": device}
    spec = {"target": dict(engine, checkpoint=str(root / "llama")),
            "drafters": {"itself": dict(engine, checkpoint=str(root / "llama"))},
            "speculation_mode": "autoregressive"}
    started = time.perf_counter()
    try:
        server = start_server(spec, root, text_models=False)
    except Exception as error:
        log = root / "tritonserver.log"
        say("server failed to start:", repr(error))
        say(log.read_text()[-6000:] if log.exists() else "(no log)")
        return 1
    say(f"tritonserver up in {time.perf_counter() - started:.0f} s; engines on",
        torch.cuda.get_device_name() if device == "gpu" else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(root / "llama", dtype=torch.float32).to(torch_device)
    failures = 0
    try:
        for prompt in PROMPTS[:3]:
            want = transformers_greedy(model, [tokenizer.encode(prompt)], 24)[0]
            for mode in ("autoregressive", "vanilla", "cosine"):
                began = time.perf_counter()
                got = as_list(generate(server, text_input=prompt, max_tokens=24, speculation_mode=mode)["output_ids"])
                ok = got == want
                failures += not ok
                say(f"  {mode:15s} {'ok' if ok else 'FAIL'} {1000 * (time.perf_counter() - began):6.0f} ms "
                    f"{'' if ok else f'served {got} transformers {want}'}")
        failures += not sampled_rounds_accept_the_target_as_drafter(server)
        metrics = urllib.request.urlopen(server.metrics_url).read().decode()
        say("\n".join(line for line in metrics.splitlines()
                      if line.startswith(("cosine_engine_batches_total", "cosine_requests_total"))))
    finally:
        server.stop()
    if device == "gpu":
        say(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.used", "--format=csv"], capture_output=True,
                           text=True).stdout)
    say("FAILED" if failures else f"all modes matched transformers ({device})")
    return 1 if failures else 0


def sampled_rounds_accept_the_target_as_drafter(server) -> bool:
    """A seeded sampled vanilla request drafting with the target's own checkpoint at temperature 1, alone: its rounds
    run in the target (the drafter copy's q handed to acceptance on the engines' device), min(1, p/q) = 1, so nearly
    every draft token must be accepted."""
    before = metric(server, "cosine_drafts_total", origin="target")
    _, drafted, accepted = generate(server, text_input=PROMPTS[0], max_tokens=40, speculation_mode="vanilla",
                                    drafters=["itself"], num_draft_tokens=4, temperature=1.0, random_seed=3,
                                    return_stats=True)["speculation_stats"]
    in_target = metric(server, "cosine_drafts_total", origin="target") - before
    ok = drafted > 0 and accepted >= 0.95 * drafted and in_target > 0
    say(f"  sampled vanilla {'ok' if ok else 'FAIL'} (the target as drafter, T 1): {accepted} of {drafted} draft "
        f"tokens accepted, {in_target:.0f} rounds in the target")
    return ok


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))

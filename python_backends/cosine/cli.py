"""`cosine` command line. Each subcommand is a (configure parser, run) pair in COMMANDS."""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable

from cosine.launcher import LaunchError, TritonServer


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.set_defaults(exit=False)
    p.add_argument("--model-repository", required=True, help="Triton model repository directory")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log-file", default=None, help="server log (default: a file in a new temp dir)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")


def _serve(args: argparse.Namespace, after_ready: Callable[[TritonServer], None] | None = None) -> int:
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    server = TritonServer(args.model_repository, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, log_path=args.log_file)
    try:
        server.start(timeout=args.timeout)
        print(f"Triton ready\n  HTTP:    {server.http_url}\n  gRPC:    {server.grpc_url}\n"
              f"  metrics: {server.metrics_url}\n  log:     {server.log_path}", flush=True)
        if after_ready is not None:
            after_ready(server)
            if args.exit:
                return 0
        print("Ctrl-C to stop.", flush=True)
        code = server.wait()
        # Only reached if the server died on its own and could not be restarted.
        raise LaunchError(f"tritonserver exited unexpectedly with code {code}; "
                          f"last lines of {server.log_path}:\n{server.log_tail()}")
    except KeyboardInterrupt:
        print("Stopping Triton...", file=sys.stderr, flush=True)
        return 0
    finally:
        server.stop()


def _demo_args(p: argparse.ArgumentParser) -> None:
    _serve_args(p)
    p.add_argument("--prompts", required=True, help="held-out prompts (JSON lines with 'prompt' and 'domain')")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--exit", action="store_true", help="stop the server after the demo answers")


def _demo(args: argparse.Namespace) -> int:
    """Serves the repository, answers one held-out prompt per domain in cosine mode, then keeps serving."""
    import json
    from pathlib import Path

    from cosine_client.api import http_generate

    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    first_per_domain = {}
    for row in rows:
        first_per_domain.setdefault(row["domain"], row["prompt"])

    def answer(server: TritonServer) -> None:
        for domain, prompt in first_per_domain.items():
            print(f"\n--- {domain} ---\n\033[2m{prompt}\033[0m", end="", flush=True)
            stats = []
            for event in http_generate(server.http_url, stream=True, text_input=prompt, max_tokens=args.max_tokens,
                                       exclude_input_in_output=True, return_stats=True, speculation_mode="cosine"):
                print(event.text, end="", flush=True)
                stats = event.stats or stats
            rounds, drafted, accepted = stats
            # nothing drafted: speculation was off for the load (cosine_speculation_allowed), or no drafter answered
            note = "" if drafted else ", decoded plainly"
            print(f"\n[cosine: {rounds} rounds, {accepted} of {drafted} drafted tokens accepted{note}]")
        print(f"\nTry it:\n  curl -s localhost:{args.http_port}/v2/models/cosine/generate "
              f"-d '{{\"text_input\": \"def add(a, b):\", \"max_tokens\": 32}}'\n")

    return _serve(args, after_ready=answer)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "serve": ("start Triton on a model repository and wait for Ctrl-C", _serve_args, _serve),
    "demo": ("serve a repository and answer a held-out prompt per domain", _demo_args, _demo),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cosine", description="CoSine speculative inference on Triton")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, configure, run) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except LaunchError as e:
        print(f"cosine {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""cosine-client: generate text from a CoSine deployment (and, with `bench`, measure it; with `relay`, put
a slower network in front of a server)."""
from __future__ import annotations

import argparse
import sys

from .api import grpc_generate, http_generate


def _generate(args) -> int:
    inputs = dict(text_input=args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, random_seed=args.seed,
                  exclude_input_in_output=not args.include_prompt, stop_words=args.stop or None,
                  speculation_mode=args.mode, num_draft_tokens=args.num_draft_tokens)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    call = grpc_generate if args.protocol == "grpc" else http_generate
    url = args.url or ("localhost:8001" if args.protocol == "grpc" else "localhost:8000")
    try:
        for event in call(url, stream=args.stream, **inputs):
            print(event.text, end="", flush=True)
    except Exception as error:  # the server's message is the useful part
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    print()
    return 0


def _numbers(kind):
    return lambda text: tuple(kind(part) for part in text.split(",") if part)


def _bench(args) -> int:
    from .bench import markdown_table, references_table, run_bench

    url = args.url or ("localhost:8001" if args.protocol == "grpc" else "localhost:8000")
    metrics_url = args.metrics_url or f"http://{url.rsplit(':', 1)[0]}:8002/metrics"
    results = run_bench(url, args.prompts, modes=args.modes.split(","), concurrencies=args.concurrency,
                        requests_per_point=args.requests, max_tokens=args.max_tokens, protocol=args.protocol,
                        quick=args.quick, poisson_rates=args.poisson_rates, rounds=args.rounds, out_dir=args.out,
                        metrics_url=None if metrics_url == "none" else metrics_url, spec=args.spec,
                        sampling={name: value for name, value in (("temperature", args.temperature),
                                                                  ("top_p", args.top_p)) if value is not None})
    print(markdown_table(results["summaries"]))
    if results["references"]:
        print("\n" + references_table(results["summaries"], results["references"]))
    print("\nper engine and run: busy fraction (drafters and target busy at once = pipelining), sequences per pass:")
    for run, models in results["engine_activity"].items():
        print(f"  {run:<28}" + "  ".join(f"{model} {stats['busy_fraction']:.2f} / {stats['sequences_per_pass']:.1f}"
                                          for model, stats in sorted(models.items())))
    print(f"\nwrote {args.out}/results.json, results.md and {len(results['plots'])} plots")
    return 0


def _relay(args) -> int:
    import asyncio

    from cosine.address import split_host_port

    from .relay import serve

    host, port = split_host_port(args.listen, default_host="127.0.0.1")
    try:
        asyncio.run(serve(args.to, args.delay_ms / 1e3, host, port))
    except KeyboardInterrupt:
        pass
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cosine-client", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text for a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--protocol", choices=("http", "grpc"), default="http")
    gen.add_argument("--url", help="host:port (default localhost:8000 for HTTP, localhost:8001 for gRPC)")
    gen.add_argument("--stream", action="store_true")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--include-prompt", action="store_true", help="echo the prompt before the generated text")
    gen.add_argument("--mode", help="speculation_mode: autoregressive | vanilla | specinfer | cosine")
    gen.add_argument("--num-draft-tokens", type=int)
    gen.set_defaults(run=_generate)
    bench = commands.add_parser("bench", help="compare speculation modes under closed- and open-loop load",
                                description="Settings not given take the defaults shown, or with --quick those "
                                            "of a short sweep.")
    bench.add_argument("--url", help="host:port (default localhost:8000 for HTTP, localhost:8001 for gRPC)")
    bench.add_argument("--protocol", choices=("http", "grpc"), default="http")
    bench.add_argument("--prompts", required=True, help="held-out prompts, JSON lines with 'prompt' and 'domain'")
    bench.add_argument("--modes", default="autoregressive,vanilla,specinfer,cosine",
                       help="modes or variants MODE[:option=value]... (k, drafters, max_drafters, adaptive), e.g. "
                            "vanilla:k=6,cosine:drafters=general,cosine:max_drafters=1,cosine:k=6:adaptive=off")
    bench.add_argument("--temperature", type=float, help="sample at this temperature (default greedy)")
    bench.add_argument("--top-p", type=float, help="with --temperature")
    bench.add_argument("--concurrency", type=_numbers(int), help="closed-loop workers (default 1,8,16,32,64)")
    bench.add_argument("--requests", type=int, help="requests per mode, load point and round (default 32)")
    bench.add_argument("--max-tokens", type=int, help="output tokens per request (default 64)")
    bench.add_argument("--rounds", type=int, help="repetitions of every load point (default 2)")
    bench.add_argument("--poisson-rates", type=_numbers(float), help="open-loop arrival rates, requests/s")
    bench.add_argument("--quick", action="store_true",
                       help="short sweep: concurrency 1,4,8, 8 requests, 32 tokens, 1 round")
    bench.add_argument("--out", default="results/bench", help="output directory")
    bench.add_argument("--spec", help="the deployment spec: adds in-process references on its checkpoints "
                                      "(engine and transformers batched decode, assisted generation at c=1)")
    bench.add_argument("--metrics-url", help="Prometheus endpoint for engine busy fractions "
                                             "(default http://<host>:8002/metrics; 'none' to skip)")
    bench.set_defaults(run=_bench)
    relay = commands.add_parser("relay", help="a TCP relay that adds latency (a slower network between two servers)",
                                description="Forwards TCP connections, delaying every byte by --delay-ms in each "
                                            "direction: the round trip grows by twice that.")
    relay.add_argument("--listen", required=True, metavar="[HOST:]PORT", help="where to listen (host 127.0.0.1)")
    relay.add_argument("--to", required=True, metavar="HOST:PORT", help="where to forward, e.g. a gRPC endpoint")
    relay.add_argument("--delay-ms", type=float, required=True, help="one-way delay in milliseconds")
    relay.set_defaults(run=_relay)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

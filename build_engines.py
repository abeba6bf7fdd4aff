#!/usr/bin/env python3
"""Builds what a CoSine deployment serves and writes its Triton model repository.

  python build_engines.py --demo                  train the demo zoo (general target, specialist + general
                                                  drafters) on this machine, then write the repository
  python build_engines.py --target DIR --drafter NAME=DIR [--drafter ...]
                                                  serve your own HF checkpoints (same tokenizer required)
  python build_engines.py --spec deployment.yaml  (re)write the repository from an existing spec
        [--build-trtllm]                          first build the TensorRT-LLM engines of its `kind: trtllm` models
                                                  (inside the NGC trtllm container; progress shown)
        [--dry-run]                               only print the exact engine build commands (any machine)
  python build_engines.py --spec deployment.yaml --node NAME --repository DIR
                                                  write the repository of one node of a multi-node spec (its
                                                  drafters only; `main`, the default, is the target's node)

Every mode writes a deployment spec (YAML: models, paths, target replicas, batching, KV budget, ports) and generates the
model repository from it. Re-running with unchanged inputs does no training and rebuilds no engine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "python_backends"))

from cosine.contract import GENERAL_DRAFTER  # noqa: E402
from cosine.deploy.repository import write_repository  # noqa: E402
from cosine.deploy.spec import MAIN_NODE, SpecError, dump_spec, load_spec, parse_spec  # noqa: E402
from cosine.deploy.trtllm_build import CONTAINER, build_engines, describe, engine_builds  # noqa: E402

# Engine settings for a small CPU: one torch thread per engine process. Several processes share the cores, and a
# multi-threaded torch whose threads get descheduled waits at every barrier (measured on 2 cores: a target step took
# 80 ms with 2 threads beside one busy core, 6 ms with 1).
TARGET_ENGINE = {"kv_cache_tokens": 65536, "max_batch_size": 32}
DRAFTER_ENGINE = {"kv_cache_tokens": 65536, "max_batch_size": 32}


def demo_spec(zoo_dir: Path, profile: str, spec_path: Path) -> None:
    from cosine.zoo import build_zoo

    manifest = build_zoo(zoo_dir, profile=profile, progress=True)
    raw = {
        "target": dict(TARGET_ENGINE, checkpoint=str(zoo_dir / manifest["target"]["path"])),
        # the zoo's drafters are tiny (79k parameters): they step in the `cosine` process, a hop per round less
        # (docs/architecture.md, "Drafters in the cosine process")
        "drafters": {name: dict(DRAFTER_ENGINE, checkpoint=str(zoo_dir / drafter["path"]), in_cosine_process=True)
                     for name, drafter in manifest["drafters"].items()},
        "speculation_mode": "cosine",
        "general_drafter": GENERAL_DRAFTER,
    }
    dump_spec(parse_spec(raw, Path(".")), spec_path)


def user_spec(target: Path, drafters: list[str], spec_path: Path) -> None:
    from cosine.zoo.checkpoints import check_compatible

    named = {}
    for item in drafters:
        name, sep, path = item.partition("=")
        if not sep:
            raise SpecError(f"--drafter {item!r}: expected NAME=DIR")
        named[name] = Path(path).resolve()
    check_compatible(target, named)
    raw = {"target": dict(TARGET_ENGINE, checkpoint=str(Path(target).resolve())),
           "drafters": {name: dict(DRAFTER_ENGINE, checkpoint=str(path)) for name, path in named.items()},
           "speculation_mode": "cosine" if named else "autoregressive"}
    dump_spec(parse_spec(raw, Path(".")), spec_path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", action="store_true", help="build the demo zoo on this machine")
    source.add_argument("--target", type=Path, help="your target's HF checkpoint directory")
    source.add_argument("--spec", type=Path, help="an existing deployment spec")
    parser.add_argument("--drafter", action="append", default=[], metavar="NAME=DIR", help="a drafter checkpoint")
    parser.add_argument("--profile", default="demo", choices=("demo", "tiny"), help="demo zoo size")
    parser.add_argument("--zoo-dir", type=Path, help="where the demo zoo goes (default artifacts/zoo-<profile>)")
    parser.add_argument("--out-spec", type=Path, help="spec to write (default artifacts/deployment-<name>.yaml)")
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository",
                        help="model repository to write (default: the checked-in model_repository/)")
    parser.add_argument("--build-trtllm", action="store_true",
                        help=f"build the spec's TensorRT-LLM engines first (inside {CONTAINER})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the TensorRT-LLM engine build commands and exit (needs --spec)")
    parser.add_argument("--node", default=MAIN_NODE,
                        help=f"the node whose repository to write (default {MAIN_NODE}: the target's)")
    args = parser.parse_args(argv)
    if args.dry_run and not args.spec:
        parser.error("--dry-run needs --spec")
    try:
        if args.dry_run:
            print(describe(engine_builds(load_spec(args.spec))) or "no kind: trtllm models in this spec")
            return 0
        if args.spec:
            spec_path = args.spec
        elif args.demo:
            spec_path = args.out_spec or ROOT / "artifacts" / f"deployment-{args.profile}.yaml"
            demo_spec((args.zoo_dir or ROOT / "artifacts" / f"zoo-{args.profile}").resolve(), args.profile, spec_path)
        else:
            spec_path = args.out_spec or ROOT / "artifacts" / "deployment-user.yaml"
            user_spec(args.target, args.drafter, spec_path)
        spec = load_spec(spec_path)
        builds = engine_builds(spec)
        if args.build_trtllm:
            build_engines(builds)
        repository = write_repository(spec, args.repository, relative_paths=True, node=args.node)
    except (SpecError, ValueError, RuntimeError) as error:
        print(f"build_engines: error: {error}", file=sys.stderr)
        return 2
    models = [model for model, (_, engine) in spec.engines().items() if engine.node == args.node]
    in_cosine = ", ".join(spec.drafters_in_cosine_process) if args.node == MAIN_NODE else ""
    print(f"deployment spec: {spec_path}\nmodel repository ({args.node} node): {repository}\n"
          f"models: {', '.join(models) or 'none'}" + (f"\ndrafters in the cosine process: {in_cosine}"
                                                       if in_cosine else ""))
    for build in (build for build in builds if not build.built):
        print(f"{build.model}: TensorRT-LLM engine not built yet ({build.engine_dir}); the repository refers to it. "
              f"Build it inside {CONTAINER} with: python build_engines.py --spec {spec_path} --build-trtllm "
              f"(--dry-run prints the commands)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`pip install ARGS` into the running interpreter's venv, done by uv where that keeps pip's meaning (the Makefile's
venv target runs it as `.venv/bin/python .ci/venv_install.py ARGS`).

uv resolves, downloads and unpacks in parallel and skips byte-compiling (imports compile what they use): a fresh venv
installs in seconds rather than minutes. uv does not read pip's configuration, so this hands pip's own (`pip config
list`: config files and PIP_* variables, [global] < [install] < environment) to uv as flags: index-url,
extra-index-url, find-links, no-index, constraint, cert, trusted-host, timeout. With several indexes uv takes the
best version from all of them, as pip does (--index-strategy unsafe-best-match). Any other pip setting that would
change what gets installed, a uv that cannot be had (no registry), or a failing uv run: plain `pip install ARGS`.
Set VENV_INSTALL=pip to always use pip.
"""
from __future__ import annotations

import ast
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

UV_REQUIREMENT = os.environ.get("UV_REQUIREMENT", "uv==0.13.9")
PIP = [sys.executable, "-m", "pip"]
# pip settings that do not change what is installed (or that uv is told through the environment below)
NEUTRAL = {"disable-pip-version-check", "no-input", "progress-bar", "no-color", "quiet", "verbose", "log",
           "root-user-action", "no-cache-dir", "cache-dir", "no-python-version-warning", "require-virtualenv",
           "break-system-packages", "retries", "use-feature"}
LISTS = {"extra-index-url", "find-links", "constraint", "trusted-host"}


def pip_settings() -> dict[str, str]:
    """pip's effective settings for `pip install`: {option: value}."""
    listed = subprocess.run([*PIP, "config", "list"], capture_output=True, text=True, check=True).stdout
    sections: dict[str, dict[str, str]] = {}
    for line in listed.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        section, _, option = key.rpartition(".")
        sections.setdefault(section, {})[option] = ast.literal_eval(value)
    settings: dict[str, str] = {}
    for section in ("global", "install", ":env:"):  # pip's own order: later ones win
        settings.update(sections.get(section, {}))
    return settings


def uv_command(settings: dict[str, str]) -> tuple[list[str], dict[str, str]] | None:
    """uv's arguments and extra environment for pip's settings; None where uv cannot mean the same."""
    args = ["--index-strategy", "unsafe-best-match"]
    env: dict[str, str] = {}
    for option, value in settings.items():
        values = value.split() if option in LISTS else [value]
        if option == "index-url":
            args += ["--index-url", value]
        elif option == "extra-index-url":
            args += [arg for url in values for arg in ("--extra-index-url", url)]
        elif option == "find-links":
            args += [arg for link in values for arg in ("--find-links", link)]
        elif option == "constraint":
            args += [arg for path in values for arg in ("--constraint", path)]
        elif option == "trusted-host":
            args += [arg for host in values for arg in ("--allow-insecure-host", host)]
        elif option == "no-index":
            if value.lower() in ("1", "true", "yes", "on"):
                args.append("--no-index")
        elif option == "cert":
            env["SSL_CERT_FILE"] = value
        elif option in ("timeout", "default-timeout"):
            env["UV_HTTP_TIMEOUT"] = str(int(float(value)))
        elif option not in NEUTRAL:
            print(f"venv_install: pip setting {option}={value!r} has no uv translation here; using pip",
                  file=sys.stderr)
            return None
    return args, env


def find_uv() -> str | None:
    """The venv's uv, installed there by pip first if needed (None where that fails)."""
    uv = Path(sysconfig.get_path("scripts")) / "uv"
    if not os.access(uv, os.X_OK) and subprocess.run([*PIP, "install", "-q", UV_REQUIREMENT]).returncode != 0:
        return None
    return str(uv) if os.access(uv, os.X_OK) else None


# What the tests, the servers' Python-backend stubs and the tools import: their bytecode is written once here.
WARM_IMPORTS = ["torch", "transformers", "transformers.models.llama.modeling_llama",
                "transformers.models.qwen2.modeling_qwen2", "transformers.models.mistral.modeling_mistral",
                "transformers.generation.utils", "numpy", "safetensors.torch", "tokenizers", "yaml", "tqdm",
                "tritonclient.http", "tritonclient.grpc", "tritonclient.utils", "matplotlib.pyplot", "pytest"]


def warm_bytecode() -> None:
    """uv installs without byte-compiling (pip compiles every file: torch and transformers alone are ~5,000). Where
    PYTHONDONTWRITEBYTECODE is set, nothing would ever write the bytecode, and every process that imports torch and
    transformers (each Python-backend stub of each test server) would compile them again, ~5 s each. One import of
    what the project uses, with writing allowed, caches just that (a few seconds)."""
    code = ("import importlib\n"
            f"for name in {WARM_IMPORTS!r}:\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as error:\n        print(f'venv_install: warm-up import {name}: {error}')\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", code], env=env)


def main(requirements: list[str]) -> int:
    if os.environ.get("VENV_INSTALL") != "pip":
        translated = uv_command(pip_settings())
        uv = find_uv() if translated else None
        if uv:
            args, env = translated
            command = [uv, "pip", "install", "--python", sys.executable, *args, *requirements]
            print("+", shlex.join(command), flush=True)
            if subprocess.run(command, env={**os.environ, **env}).returncode == 0:
                warm_bytecode()
                return 0
            print("venv_install: uv failed; installing with pip", file=sys.stderr)
    command = [*PIP, "install", *requirements]
    print("+", shlex.join(command), flush=True)
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

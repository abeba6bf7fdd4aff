VENV ?= .venv
PY = $(VENV)/bin/python
PIP = $(PY) -m pip
MODEL_REPOSITORY ?= model_repository
# The CPU build of this version is on CPU machines; an unpinned torch pulls GBs of CUDA wheels.
TORCH_VERSION ?= 2.13.0
STAMP = $(VENV)/.installed

.PHONY: venv test demo serve bench clean

venv: $(STAMP)

# torch is pinned first on machines without nvidia-smi; nvidia-pytriton (bundled tritonserver,
# pins numpy<2) only where no tritonserver is on PATH (NGC containers have one).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install 'torch==$(TORCH_VERSION)'; fi
	$(PIP) install -e '.[test]'
	if ! command -v tritonserver >/dev/null 2>&1; then $(PIP) install nvidia-pytriton 'numpy<2'; fi
	touch $@

test: venv
	$(PY) -m pytest -q tests

# Builds the demo zoo on first run (about 10 minutes on 2 cores, progress shown; reused afterwards), writes
# model_repository/ for it, serves it and answers one held-out prompt per domain.
demo: venv
	$(PY) build_engines.py --demo
	$(PY) -m cosine.cli demo --model-repository $(MODEL_REPOSITORY) --prompts artifacts/zoo-demo/prompts/mixed.jsonl $(DEMO_ARGS)

serve: venv
	$(PY) -m cosine.cli serve --model-repository $(MODEL_REPOSITORY)

clean:
	rm -rf $(VENV)

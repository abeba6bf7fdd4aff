VENV ?= .venv
PY = $(VENV)/bin/python
MODEL_REPOSITORY ?= model_repository
# The CPU build of this version is on CPU machines; an unpinned torch pulls GBs of CUDA wheels.
TORCH_VERSION ?= 2.13.0
STAMP = $(VENV)/.installed

.PHONY: venv test demo serve bench clean tools gpu-check gpu-serve-check

venv: $(STAMP)

# One install of: the project with its test extras; torch pinned on machines without nvidia-smi; nvidia-pytriton
# (bundled tritonserver, pins numpy<2) only where no tritonserver is on PATH (NGC containers have one).
# .ci/venv_install.py installs with uv under pip's configuration (indexes, find-links, constraints), in seconds;
# plain pip where it cannot (VENV_INSTALL=pip forces pip).
$(STAMP): pyproject.toml Makefile .ci/venv_install.py
	test -x $(PY) || python3 -m venv $(VENV)
	set -- -e '.[test]'; \
	if ! command -v nvidia-smi >/dev/null 2>&1; then set -- "$$@" 'torch==$(TORCH_VERSION)'; fi; \
	if ! command -v tritonserver >/dev/null 2>&1; then set -- "$$@" nvidia-pytriton 'numpy<2'; fi; \
	$(PY) .ci/venv_install.py "$$@"
	touch $@

test: venv
	$(PY) -m pytest -q --durations=12 tests

# Builds the demo zoo on first run (about 11 minutes on 2 cores, progress shown; reused afterwards), writes
# model_repository/ for it, serves it and answers one held-out prompt per domain.
demo: venv
	$(PY) build_engines.py --demo
	$(PY) -m cosine.cli demo --model-repository $(MODEL_REPOSITORY) --prompts artifacts/zoo-demo/prompts/mixed.jsonl $(DEMO_ARGS)

serve: venv
	$(PY) -m cosine.cli serve --model-repository $(MODEL_REPOSITORY)

clean:
	rm -rf $(VENV)

# On a CUDA machine without Triton or network (python3 with torch + transformers): exactness + batch scaling.
# The project venv's python where there is one (a dev machine: `make gpu-check GPU_CHECK_ARGS=--device\ cpu`), else
# python3 (the bare GPU machine).
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PYTHONPATH=python_backends:client $(GPU_CHECK_PY) -m cosine_client.gpu_check $(GPU_CHECK_ARGS)

# The same machine, through Triton: needs the nvidia-pytriton, tritonclient and python-rapidjson wheels besides
gpu-serve-check:
	$(GPU_CHECK_PY) tests/gpu_serve_check.py gpu

# ---- Load-testing tools (perf_analyzer, genai-perf) under artifacts/tools/, apart from the project venv ----
# perf_analyzer: the binary inside the manylinux tritonclient wheel (the PyPI `perf-analyzer` package is an empty
# placeholder); it needs Debian's libb64-0d and libcudart.so.12 (PyPI nvidia-cuda-runtime-cu12, no GPU needed).
# genai-perf gets its own venv: its dependencies conflict with the project's (numpy 2, pandas, ...).
# Run them as artifacts/tools/bin/perf_analyzer and artifacts/tools/bin/genai-perf (wrappers set the paths).
TOOLS_DIR ?= artifacts/tools
TOOLS_VENV = $(TOOLS_DIR)/venv
TOOLS_PY = $(TOOLS_VENV)/bin/python
TRITONCLIENT_VERSION ?= 2.51.0
GENAI_PERF_VERSION ?= 0.0.16
CUDA_RUNTIME_VERSION ?= 12.9.79
# The dependency set genai-perf 0.0.16 was verified with (Python 3.11), used as pip constraints.
TOOLS_PINS = alembic==1.20.1 annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.16.0 certifi==2026.10.19.post1 \
  cffi==2.1.1 charset-normalizer==3.5.2 choreographer==1.4.0 click==8.5.1 colorlog==6.12.0 cramjam==2.14.0 \
  fastparquet==2026.9.0 filelock==4.2.12 formulaic==1.2.2 fsspec==2026.9.0 h11==0.16.0 hf-xet==1.8.0 \
  httpcore2==2.16.2 httpx2==2.16.2 huggingface_hub==2.4.0 idna==3.20 iniconfig==2.3.1 interface_meta==2.0.1 \
  Jinja2==3.1.6 kaleido==1.5.0 logistro==2.0.1 Mako==1.4.3 markdown-it-py==4.3.0 MarkupSafe==3.0.4 mdurl==0.1.2 \
  narwhals==2.29.0 numpy==2.4.6 optuna==3.6.1 orjson==3.13.0 packaging==26.3 pandas==3.1.1 patsy==1.0.3 \
  perf_analyzer==0.1.0 pillow==13.0.0 platformdirs==4.14.8 plotly==7.1.0 pluggy==1.7.0 pyarrow==26.0.1 \
  pycparser==3.12 pydantic==2.14.4 pydantic_core==2.50.5 Pygments==2.21.0 pytest==9.2.0 pytest-mock==3.17.0 \
  python-dateutil==4.0.0 PyYAML==6.0.4 regex==2026.11.19 requests==2.34.2 responses==0.26.3 rich==15.0.0 \
  safetensors==0.8.0 scipy==1.17.1 shellingham==1.5.4 simplejson==4.3.0 soundfile==0.14.0 SQLAlchemy==2.1.9 \
  statsmodels==0.15.0 tokenizers==0.23.3 tqdm==4.70.1 transformers==5.24.0 truststore==0.10.5 typer==0.29.2 \
  typing-inspection==0.4.5 typing_extensions==4.16.0 tzdata==2026.6 urllib3==2.8.0 wrapt==2.5.2
PERF_ANALYZER_BIN = $(TOOLS_DIR)/libexec/perf_analyzer-$(TRITONCLIENT_VERSION)
# The stamp's name changes with any version or pin, so that `make tools` redoes the install then, and only then.
TOOLS_KEY := $(shell printf '%s' '$(TRITONCLIENT_VERSION) $(GENAI_PERF_VERSION) $(CUDA_RUNTIME_VERSION) $(TOOLS_PINS)' | cksum | cut -d' ' -f1)
TOOLS_STAMP = $(TOOLS_DIR)/.installed-$(TOOLS_KEY)

define PERF_ANALYZER_WRAPPER
#!/bin/sh
# Written by `make tools`: perf_analyzer $(TRITONCLIENT_VERSION) with libcudart.so.12 from $(TOOLS_DIR)/lib.
tools=$$(dirname "$$(dirname "$$(readlink -f "$$0")")")
export LD_LIBRARY_PATH="$$tools/lib$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}"
exec "$$tools/libexec/perf_analyzer-$(TRITONCLIENT_VERSION)" "$$@"
endef

define GENAI_PERF_WRAPPER
#!/bin/sh
# Written by `make tools`: genai-perf $(GENAI_PERF_VERSION) from its own venv, finding the perf_analyzer wrapper on
# PATH. No Hugging Face hub by default (pass a local tokenizer directory); set HF_HUB_OFFLINE=0 to allow it.
tools=$$(dirname "$$(dirname "$$(readlink -f "$$0")")")
export PATH="$$tools/bin:$$PATH" HF_HUB_OFFLINE="$${HF_HUB_OFFLINE:-1}"
exec "$$tools/venv/bin/genai-perf" "$$@"
endef
export PERF_ANALYZER_WRAPPER GENAI_PERF_WRAPPER

tools: $(TOOLS_STAMP)

$(TOOLS_STAMP):
	mkdir -p $(TOOLS_DIR)/bin $(TOOLS_DIR)/lib $(TOOLS_DIR)/libexec
	if { ldconfig -p 2>/dev/null || /sbin/ldconfig -p; } | grep -q 'libb64\.so\.0d'; then \
	  echo "libb64.so.0d present"; \
	else \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y libb64-0d || { apt-get update && apt-get install -y libb64-0d; }; \
	fi
	test -x $(TOOLS_PY) || python3 -m venv $(TOOLS_VENV)
	printf '%s\n' $(TOOLS_PINS) > $(TOOLS_DIR)/constraints.txt
	$(TOOLS_PY) -m pip install -c $(TOOLS_DIR)/constraints.txt 'genai-perf==$(GENAI_PERF_VERSION)' \
	  'nvidia-cuda-runtime-cu12==$(CUDA_RUNTIME_VERSION)'
	ln -sfnr "$$($(TOOLS_PY) -c 'import nvidia.cuda_runtime as m, os; print(os.path.realpath(m.__path__[0]))')/lib/libcudart.so.12" \
	  $(TOOLS_DIR)/lib/libcudart.so.12
	test -e $(TOOLS_DIR)/lib/libcudart.so.12
	if ! test -x $(PERF_ANALYZER_BIN); then \
	  rm -rf $(TOOLS_DIR)/download && \
	  $(TOOLS_PY) -m pip download --no-deps --only-binary=:all: -d $(TOOLS_DIR)/download \
	    'tritonclient==$(TRITONCLIENT_VERSION)' && \
	  $(TOOLS_PY) -c 'import glob, os, sys, zipfile; \
	    wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + "/tritonclient-*.whl")[0]); \
	    name = [n for n in wheel.namelist() if n.endswith(".data/data/bin/perf_analyzer")][0]; \
	    open(sys.argv[2] + ".tmp", "wb").write(wheel.read(name)); os.chmod(sys.argv[2] + ".tmp", 0o755); \
	    os.replace(sys.argv[2] + ".tmp", sys.argv[2])' $(TOOLS_DIR)/download $(PERF_ANALYZER_BIN) && \
	  rm -rf $(TOOLS_DIR)/download; \
	fi
	printf '%s\n' "$$PERF_ANALYZER_WRAPPER" > $(TOOLS_DIR)/bin/perf_analyzer
	printf '%s\n' "$$GENAI_PERF_WRAPPER" > $(TOOLS_DIR)/bin/genai-perf
	chmod +x $(TOOLS_DIR)/bin/perf_analyzer $(TOOLS_DIR)/bin/genai-perf
	$(TOOLS_DIR)/bin/perf_analyzer --version
	$(TOOLS_DIR)/bin/genai-perf --version
	rm -f $(TOOLS_DIR)/.installed-*
	touch $@

# CoSine in NVIDIA's Triton + TensorRT-LLM container: tritonserver with the Python and tensorrtllm backends, torch
# and TensorRT-LLM are the container's own. The project goes in without its dependencies, and only what is missing
# is added, held to every version the container already has, so nothing of the container is replaced.
#   docker build -t cosine-trtllm .
#   docker run --rm --gpus all -v $PWD/artifacts:/opt/cosine/artifacts cosine-trtllm python3 build_engines.py \
#     --spec examples/deployment-trtllm.yaml --build-trtllm --repository artifacts/model_repository_trtllm
#   docker run --rm --gpus all --shm-size=2g -p 8000-8002:8000-8002 -v $PWD/artifacts:/opt/cosine/artifacts \
#     cosine-trtllm cosine serve --model-repository /opt/cosine/artifacts/model_repository_trtllm
# The default CMD serves the checked-in model_repository/ (portable engines; build them with build_engines.py).
# Client tools (cosine-client, benchmarks) run from any machine with `pip install .`.
FROM nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3
WORKDIR /opt/cosine
COPY pyproject.toml README.md build_engines.py ./
COPY python_backends python_backends
COPY client client
COPY model_repository model_repository
COPY examples examples
# pyyaml and tqdm by name, not `pip install .` with its dependencies: resolving pyproject's whole list would also pull
# client-only packages (matplotlib), and a pin that disagrees with a container version (numpy<2) would fail the build.
RUN pip list --format=freeze > /tmp/container-packages.txt \
    && pip install --no-cache-dir --no-deps -e . \
    && pip install --no-cache-dir --constraint /tmp/container-packages.txt pyyaml tqdm \
    && rm /tmp/container-packages.txt
EXPOSE 8000 8001 8002
CMD ["cosine", "serve", "--model-repository", "/opt/cosine/model_repository"]

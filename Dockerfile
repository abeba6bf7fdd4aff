# NGC deployment: Triton's image already has tritonserver and its Python backend; add CoSine on top.
#   docker build -t cosine .
#   docker run --gpus all -p 8000-8002:8000-8002 -v $PWD/artifacts:/opt/cosine/artifacts cosine
# The model repository refers to checkpoints under artifacts/ (build them with build_engines.py first).
FROM nvcr.io/nvidia/tritonserver:24.10-py3
WORKDIR /opt/cosine
COPY pyproject.toml README.md build_engines.py ./
COPY python_backends python_backends
COPY client client
COPY model_repository model_repository
RUN pip install --no-cache-dir -e .
EXPOSE 8000 8001 8002
CMD ["cosine", "serve", "--model-repository", "/opt/cosine/model_repository"]

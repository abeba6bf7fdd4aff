import os
import sys

sys.path[:0] = filter(None, os.environ.get("COSINE_PYTHONPATH", "").split(os.pathsep))  # the stub ignores PYTHONPATH

from cosine.triton.engine_model import EngineModel as TritonPythonModel  # noqa: E402,F401

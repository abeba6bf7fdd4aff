"""The trust boundary: internal models (engines, router) act only on calls from this deployment's own models.

Triton serves every model to every client that reaches its ports, and BLS calls look like any other call. Without
a check, anyone could feed the router made-up acceptance (re-routing every user's requests) or admit sequences
that hold the target's KV cache until the idle timeout. So every internal call carries the deployment's secret,
which the server's processes inherit from its environment (cosine.contract.DEPLOYMENT_SECRET_ENV); a secret
rather than a network rule, because remote drafter nodes are reached over the same network as clients."""
from __future__ import annotations

import hmac
import os

import numpy as np

from ..contract import DEPLOYMENT_SECRET, DEPLOYMENT_SECRET_ENV
from .errors import InvalidRequest


def deployment_secret() -> str:
    """This deployment's secret; internal models refuse to start without one rather than serve everyone."""
    secret = os.environ.get(DEPLOYMENT_SECRET_ENV, "")
    if not secret:
        raise RuntimeError(f"{DEPLOYMENT_SECRET_ENV} is not set in the server's environment; internal models would "
                           f"take calls from any client (`cosine serve` sets one; a deployment's nodes share it)")
    return secret


def secret_array(secret: str) -> np.ndarray:
    return np.array([secret.encode()], np.object_)


def check_caller(inputs: dict[str, np.ndarray], secret: str) -> None:
    """Refuses a call whose inputs lack the deployment's secret; removes it from `inputs`."""
    given = inputs.pop(DEPLOYMENT_SECRET, None)
    value = np.asarray(given).reshape(-1)[0] if given is not None and np.size(given) == 1 else b""
    value = value if isinstance(value, bytes) else str(value).encode()
    if not hmac.compare_digest(value, secret.encode()):
        raise InvalidRequest(DEPLOYMENT_SECRET, "missing or wrong: internal models take calls from this "
                                                "deployment's own models only")

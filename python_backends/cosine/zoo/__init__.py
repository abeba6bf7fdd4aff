"""The demo model zoo: a tokenizer, a general target and specialist drafters, trained here from scratch."""
from .build import build_zoo, read_manifest
from .checkpoints import check_compatible
from .corpus import DOMAINS
from .profiles import PROFILES

__all__ = ["DOMAINS", "PROFILES", "build_zoo", "check_compatible", "read_manifest"]

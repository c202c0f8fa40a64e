"""Collaborative decoding: routing policies, the batched engine, and the cache-free reference."""

from pipeline.decoding.engine import *  # noqa: F401,F403
from pipeline.decoding.engine import _uniform  # noqa: F401

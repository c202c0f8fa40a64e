"""Collaborative decoding: routing policies, the engine (static caches, schedules, CUDA graphs) and
the cache-free reference it must match."""

from pipeline.decoding.engine import (
    DRAFT,
    IMMEDIATE,
    SCHEDULES,
    Decoding,
    Engine,
    Generation,
    Prefix,
    Request,
    Schedule,
    Update,
    check_prompts,
    decode,
    llm_call_ratio,
    settings,
)
from pipeline.decoding.policies import (
    ConfidencePolicy,
    LLMOnly,
    Policy,
    RandomPolicy,
    RouterPolicy,
    SLMOnly,
    Speculative,
    check_threshold,
    uniform,
)
from pipeline.decoding.reference import reference_decode
from pipeline.decoding.sampling import GREEDY, Sampling, sample

__all__ = ["DRAFT", "GREEDY", "IMMEDIATE", "SCHEDULES", "ConfidencePolicy", "Decoding", "Engine", "Generation",
           "LLMOnly", "Policy", "Prefix", "RandomPolicy", "Request", "RouterPolicy", "SLMOnly", "Sampling", "Schedule",
           "Speculative", "Update", "check_prompts", "check_threshold", "decode", "llm_call_ratio",
           "reference_decode", "sample", "settings", "uniform"]

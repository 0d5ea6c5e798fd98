"""Local llama.cpp inference: one model, one context, one engine thread.

See docs/engine.md for the design (continuous batching, prefix reuse,
snapshots, threads).
"""

from .engine import EngineLoad, LocalEngine, LocalGeneration
from .registry import LocalModelRegistry, MemoryBudgetExceeded, ModelInfo
from .settings import EngineSettings, SamplingDefaults, WorkerProfile, usable_cores

__all__ = [
    "EngineLoad",
    "EngineSettings",
    "LocalEngine",
    "LocalGeneration",
    "LocalModelRegistry",
    "MemoryBudgetExceeded",
    "ModelInfo",
    "SamplingDefaults",
    "WorkerProfile",
    "usable_cores",
]

"""Local llama.cpp inference: the models manager and one engine per loaded model.

See docs/engine.md for the design (continuous batching, prefix reuse,
snapshots, threads, several models sharing the cores).
"""

from .engine import EngineLoad, LocalEngine, LocalGeneration
from .models import (
    LoadState,
    LocalModels,
    ManagedModel,
    MemoryBudgetExceeded,
    ModelFile,
    ModelSource,
)
from .settings import EngineSettings, SamplingDefaults, WorkerProfile, usable_cores

__all__ = [
    "EngineLoad",
    "EngineSettings",
    "LoadState",
    "LocalEngine",
    "LocalGeneration",
    "LocalModels",
    "ManagedModel",
    "MemoryBudgetExceeded",
    "ModelFile",
    "ModelSource",
    "SamplingDefaults",
    "WorkerProfile",
    "usable_cores",
]

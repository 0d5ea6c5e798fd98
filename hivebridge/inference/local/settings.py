"""Engine settings and worker profiles: plain dataclasses the config layer builds from YAML."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path


def usable_cores() -> int:
    """Cores this process may run on (affinity/cgroup aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """Defaults for SamplingParams fields a request leaves as ``None``."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    max_tokens: int = 256


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Everything one LocalEngine needs besides the model path.

    Partitioned KV (the default): each of the ``n_seq_max`` sequences owns
    ``n_ctx / n_seq_max`` cells and attends only over its own, so batched
    decode of many long rooms stays cheap. ~23 KB per token for SmolLM2-135M
    f16: 16,384 tokens cost ~380 MB.
    """

    n_ctx: int = 16384
    """KV cache in tokens: n_ctx / n_seq_max per sequence, or one shared pool if unified."""
    n_seq_max: int = 8
    """Sequence ids (pinned personas + idle rooms + running requests)."""
    kv_unified: bool = False
    """One KV buffer for all sequences: forks are free (shared cells), but every token
    attends over all used cells of the pool, so 8 rooms of ~900 tokens decode no faster
    together than one alone. False = one partition per sequence: attention only over the
    sequence's own cells; forks and moves copy KV data (milliseconds). See docs/engine.md.
    """
    n_batch: int = 512
    n_ubatch: int = 512
    flash_attn: bool = False
    """llama.cpp's fused attention kernel: 5-8 % faster decode here, but not batch invariant
    (greedy output may then differ from a cache-less evaluation at a near-tie); see
    docs/engine.md. False keeps the exact engine."""
    threads: int | None = None
    """Decode threads; None = usable cores. Capped at usable cores (see docs/engine.md)."""
    threads_batch: int | None = None
    """Prefill threads; None = ``threads``."""
    n_gpu_layers: int = 0
    """Layers offloaded to a GPU (-1 = all); a CPU-only llama.cpp build offloads none."""
    adaptive_threads: bool = True
    """Decode on 1 thread while another process competes for the cores (see threads.py);
    prompt chunks keep ``threads_batch``."""
    prefill_chunk: int = 256
    """Prompt tokens evaluated per scheduler step, so running streams never stall long."""
    max_seq_tokens: int = 4096
    """Cap on one request's prompt + completion (also capped at n_ctx and n_ctx_train)."""
    max_completion_tokens: int = 1024
    """Hard cap on max_tokens whatever the request asks."""
    prefix_cache: bool = True
    """Reuse KV across requests (trie, pinned personas, snapshots). False = always evaluate."""
    max_pinned: int = 8
    """At most this many persona prefixes stay pinned in the KV pool."""
    min_pin_tokens: int = 16
    """System blocks shorter than this are not worth a pinned sequence."""
    snapshot_ram_bytes: int = 256 * 1024 * 1024
    """RAM for evicted room sequences (llama_state_seq_get_data blobs); 0 disables."""
    snapshot_dir: Path | None = None
    """Directory for persona/room snapshots that survive restarts; None disables disk."""
    snapshot_disk_bytes: int = 2 * 1024 * 1024 * 1024
    """Disk budget for snapshot_dir (LRU by last use)."""
    min_snapshot_tokens: int = 64
    """Sequences shorter than this are dropped on eviction rather than snapshotted."""
    min_restore_gain: int = 32
    """Restore a snapshot only if it saves at least this many tokens over the resident match."""
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)

    def resolved_threads(self) -> tuple[int, int]:
        """(decode, batch) threads, never more than the usable cores."""
        cores = usable_cores()
        threads = min(cores, self.threads or cores)
        batch = min(cores, self.threads_batch or threads)
        return max(1, threads), max(1, batch)

    def kv_bytes(self, bytes_per_token: int) -> int:
        return self.n_ctx * bytes_per_token


@dataclass(frozen=True, slots=True)
class WorkerProfile:
    """A named parameter set ("small-fast", "long-context") applied over EngineSettings.

    ``None`` means "keep the base setting".
    """

    name: str
    n_ctx: int | None = None
    n_seq_max: int | None = None
    threads: int | None = None
    n_gpu_layers: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None

    @property
    def changes_engine(self) -> bool:
        """Whether a model loaded for this profile differs from the model's own engine."""
        return any(
            v is not None for v in (self.n_ctx, self.n_seq_max, self.threads, self.n_gpu_layers)
        )

    def apply(self, base: EngineSettings) -> EngineSettings:
        sampling_changes = {
            k: v
            for k, v in (
                ("temperature", self.temperature),
                ("top_p", self.top_p),
                ("top_k", self.top_k),
                ("min_p", self.min_p),
                ("repeat_penalty", self.repeat_penalty),
                ("max_tokens", self.max_tokens),
            )
            if v is not None
        }
        changes: dict[str, object] = {
            k: v
            for k, v in (
                ("n_ctx", self.n_ctx),
                ("n_seq_max", self.n_seq_max),
                ("threads", self.threads),
                ("n_gpu_layers", self.n_gpu_layers),
            )
            if v is not None
        }
        changes["sampling"] = replace(base.sampling, **sampling_changes)  # type: ignore[arg-type]
        return replace(base, **changes)  # type: ignore[arg-type]

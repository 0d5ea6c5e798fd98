"""Load one llama_model and build the engine's single llama_context by hand.

``Llama(n_seq_max=...)`` silently drops the argument, so the context is made
from our own ``llama_context_params`` (n_seq_max, kv_unified, flash attention)
on top of ``llama_model_load_from_file``.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as L

from .settings import EngineSettings

log = logging.getLogger(__name__)

_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        # llama.cpp logs every tensor at INFO through llama-cpp-python's logger; keep errors only.
        lib_log = logging.getLogger("llama-cpp-python")
        if lib_log.level == logging.NOTSET:
            lib_log.setLevel(logging.ERROR)
        L.llama_backend_init()
        _backend_ready = True


def file_fingerprint(path: Path) -> dict[str, object]:
    """Identity of a model file: path, size, mtime and a hash of its first MiB (the header)."""
    st = path.stat()
    with path.open("rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {
        "path": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "head": head,
    }


@dataclass(slots=True)
class LoadedModel:
    """The model, its one context and the vocabulary helpers.

    Only the engine thread may touch ``ctx``; the vocabulary is read-only after
    load, so tokenize/detokenize are safe from any thread.
    """

    path: Path
    model: object
    ctx: object
    vocab: object
    mem: object
    n_ctx: int
    n_ctx_seq: int  # cells one sequence may use (n_ctx when unified)
    kv_unified: bool
    n_seq_max: int
    n_batch: int
    n_vocab: int
    n_ctx_train: int
    add_bos: bool
    eog_tokens: tuple[int, ...]
    chat_template: str | None
    bos_text: str
    eos_text: str
    kv_bytes_per_token: int
    fingerprint: str
    n_layer: int
    offloaded_layers: int
    """Layers llama.cpp put on a GPU: 0 on a CPU-only build whatever was asked."""
    batch_invariant: bool
    """Greedy output cannot depend on batching or cache layout (docs/engine.md, Exactness)."""

    def tokenize(self, text: str, *, add_special: bool | None = None) -> list[int]:
        data = text.encode("utf-8")
        add = self.add_bos if add_special is None else add_special
        cap = len(data) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add, True)
        if n < 0:
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add, True)
        return list(buf[:n])

    def detokenize(self, tokens: list[int]) -> str:
        if not tokens:
            return ""
        arr = (L.llama_token * len(tokens))(*tokens)
        cap = len(tokens) * 16 + 16
        out = ctypes.create_string_buffer(cap)
        n = L.llama_detokenize(self.vocab, arr, len(tokens), out, cap, False, False)
        if n < 0:
            out = ctypes.create_string_buffer(-n + 1)
            n = L.llama_detokenize(self.vocab, arr, len(tokens), out, -n + 1, False, False)
        return out.raw[:n].decode("utf-8", errors="replace")

    def close(self) -> None:
        if self.ctx is not None:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            L.llama_model_free(self.model)
            self.model = None


def row_dependent_kernels(system_info: str | None = None) -> bool:
    """Whether llama.cpp's CPU kernels sum a product in an order that depends on its rows.

    Stock llamafile GEMM kernels take only products of two or more rows, so a
    decoded reply token and the same token re-read in a prompt are summed in
    different orders and differ by float noise, enough to flip a greedy
    near-tie. The Makefile's build keeps only its own Q4_1 kernel, which sums
    exactly as the one-row kernel does (``LLAMAFILE_ALL_ROWS``; patches/); a
    build without llamafile has none.
    """
    info = system_info
    if info is None:
        info = L.llama_print_system_info().decode("utf-8", "replace")
    return "LLAMAFILE = 1" in info and "LLAMAFILE_ALL_ROWS = 1" not in info


def offloaded_layers(requested: int, n_layer: int) -> int:
    """How many layers llama.cpp offloads for ``n_gpu_layers=requested``.

    The repeating layers plus the output layer count (as llama.cpp's own
    "offloaded N/M layers" line does); nothing without a GPU backend.
    """
    if requested == 0 or not L.llama_supports_gpu_offload():
        return 0
    total = n_layer + 1
    return total if requested < 0 else min(requested, total)


def _token_text(vocab: object, token: int) -> str:
    buf = ctypes.create_string_buffer(256)
    n = L.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")


def load_model(path: Path, settings: EngineSettings) -> LoadedModel:
    """Load ``path`` and create the engine's context (call from the engine thread)."""
    _init_backend()
    mparams = L.llama_model_default_params()
    mparams.n_gpu_layers = settings.n_gpu_layers
    model = L.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    try:
        n_ctx_train = int(L.llama_model_n_ctx_train(model))
        threads, threads_batch = settings.resolved_threads()
        cparams = L.llama_context_default_params()
        cparams.n_ctx = settings.n_ctx
        cparams.n_batch = settings.n_batch
        cparams.n_ubatch = min(settings.n_ubatch, settings.n_batch)
        cparams.n_seq_max = min(settings.n_seq_max, int(L.llama_max_parallel_sequences()))
        cparams.kv_unified = settings.kv_unified
        cparams.flash_attn_type = (
            L.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if settings.flash_attn
            else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.n_threads = threads
        cparams.n_threads_batch = threads_batch
        cparams.no_perf = True
        ctx = L.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx={settings.n_ctx})")
    except BaseException:
        L.llama_model_free(model)
        raise
    vocab = L.llama_model_get_vocab(model)
    n_vocab = int(L.llama_vocab_n_tokens(vocab))
    eog = tuple(t for t in range(n_vocab) if L.llama_vocab_is_eog(vocab, t))
    raw_template = L.llama_model_chat_template(model, None)
    template = raw_template.decode("utf-8") if raw_template else None
    n_layer = int(L.llama_model_n_layer(model))
    n_head = max(1, int(L.llama_model_n_head(model)))
    n_head_kv = int(L.llama_model_n_head_kv(model))
    head_dim = int(L.llama_model_n_embd(model)) // n_head
    kv_per_token = n_layer * 2 * n_head_kv * head_dim * 2
    bos = int(L.llama_vocab_bos(vocab))
    eos = int(L.llama_vocab_eos(vocab))
    key = {
        "model": file_fingerprint(path),
        "llama_cpp": L.__version__,
        "n_ctx": int(cparams.n_ctx),
        "kv_unified": bool(cparams.kv_unified),
        "n_ctx_seq": int(L.llama_n_ctx_seq(ctx)),
        "flash_attn": int(cparams.flash_attn_type),
        "type_k": int(cparams.type_k),
        "type_v": int(cparams.type_v),
        "template": hashlib.sha256((template or "").encode()).hexdigest(),
    }
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    # Unified KV interleaves sequences' cells, which changes summation order too; flash
    # attention sums a prompt's rows (tiles), a long context (KV chunks per thread) and
    # one decoded row in three different orders.
    reasons = [
        why
        for why, on in (
            ("flash attention", settings.flash_attn),
            ("unified KV", bool(cparams.kv_unified)),
            ("llama.cpp built with stock llamafile kernels", row_dependent_kernels()),
        )
        if on
    ]
    invariant = not reasons
    if not invariant:
        log.info(
            "greedy output may differ by float noise with batching and prefix reuse "
            "(%s; see docs/engine.md)",
            ", ".join(reasons),
        )
    return LoadedModel(
        path=path,
        model=model,
        ctx=ctx,
        vocab=vocab,
        mem=L.llama_get_memory(ctx),
        n_ctx=int(L.llama_n_ctx(ctx)),
        n_ctx_seq=int(L.llama_n_ctx_seq(ctx)),
        kv_unified=bool(cparams.kv_unified),
        n_seq_max=int(L.llama_n_seq_max(ctx)),
        n_batch=settings.n_batch,
        n_vocab=n_vocab,
        n_ctx_train=n_ctx_train,
        add_bos=bool(L.llama_vocab_get_add_bos(vocab)),
        eog_tokens=eog,
        chat_template=template,
        bos_text=_token_text(vocab, bos) if bos >= 0 else "",
        eos_text=_token_text(vocab, eos) if eos >= 0 else "",
        kv_bytes_per_token=kv_per_token,
        fingerprint=fingerprint,
        n_layer=n_layer,
        offloaded_layers=offloaded_layers(settings.n_gpu_layers, n_layer),
        batch_invariant=invariant,
    )

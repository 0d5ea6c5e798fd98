"""llama.cpp as the Makefile builds it: a token's logits do not depend on its batch.

A token decoded alone takes ggml's one-row kernel; the same token at the end of a
prompt, or decoded beside another sequence, takes the patched Q4_1 kernel
(patches/). Their logits must be equal bit for bit, or greedy output would depend
on the prefix cache and on batching (docs/engine.md, Kernels).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import llama_cpp as L
import numpy as np
import pytest

from hivebridge.inference.bundled import bundled_model_path

MODEL = bundled_model_path()
TEXT = b"The captain looked at the stars and said the ship would sail north at dawn, because"

pytestmark = pytest.mark.skipif(MODEL is None, reason="bundled model not installed")


@pytest.fixture(scope="module")
def context() -> Iterator[tuple[Any, Any, int]]:
    L.llama_backend_init()
    model = L.llama_model_load_from_file(str(MODEL).encode(), L.llama_model_default_params())
    params = L.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 4096, 512, 512
    params.n_seq_max, params.kv_unified = 4, False
    params.n_threads = params.n_threads_batch = 2
    ctx = L.llama_init_from_model(model, params)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    yield model, ctx, n_vocab
    L.llama_free(ctx)
    L.llama_model_free(model)


def test_a_token_alone_in_a_prompt_or_in_a_batch_gets_the_same_logits(
    context: tuple[Any, Any, int],
) -> None:
    model, ctx, n_vocab = context
    buf = (L.llama_token * 256)()
    n = L.llama_tokenize(L.llama_model_get_vocab(model), TEXT, len(TEXT), buf, 256, True, False)
    tokens = list(buf[:n])
    batch = L.llama_batch_init(512, 0, 1)

    def decode(rows: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        batch.n_tokens = len(rows)
        for i, (token, pos, seq, logits) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.logits[i] = token, pos, logits
            batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq
        assert L.llama_decode(ctx, batch) == 0
        return [
            np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()
            for i, row in enumerate(rows)
            if row[3]
        ]

    try:
        head = [(t, p, 0, False) for p, t in enumerate(tokens[:-1])]
        (in_prompt,) = decode([*head, (tokens[-1], n - 1, 0, True)])
        decode([(t, p, 1, False) for p, t in enumerate(tokens[:-1])])
        (alone,) = decode([(tokens[-1], n - 1, 1, True)])
        decode([(t, p, s, False) for s in (2, 3) for p, t in enumerate(tokens[:-1])])
        in_pair, _ = decode([(tokens[-1], n - 1, 2, True), (tokens[-1], n - 1, 3, True)])
    finally:
        L.llama_batch_free(batch)
    assert np.array_equal(alone, in_prompt), np.max(np.abs(alone - in_prompt))
    assert np.array_equal(alone, in_pair), np.max(np.abs(alone - in_pair))

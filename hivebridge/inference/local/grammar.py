"""JSON schema to a llama.cpp grammar (GBNF), for ``response_format`` on the local engine.

The conversion is llama-cpp-python's own (``llama_cpp.llama_grammar``, the
Python port of llama.cpp's json_schema_to_grammar), cached by schema text: a
persona's tool set gives the same schema on every request. The grammar is
checked once against the vocabulary, so a schema it cannot express fails the
request that brought it, never the engine thread.
"""

from __future__ import annotations

import functools

import llama_cpp as L
from llama_cpp.llama_grammar import json_schema_to_gbnf

from hivebridge.inference.types import InferenceError

#: The start rule of every grammar the converter writes.
ROOT = "root"


@functools.lru_cache(maxsize=64)
def grammar_for_schema(schema_json: str) -> str:
    """GBNF that accepts exactly the JSON values matching ``schema_json``."""
    try:
        return json_schema_to_gbnf(schema_json)
    except Exception as exc:  # the converter asserts on schemas it does not know
        raise InferenceError(f"response_format: the schema cannot be a grammar ({exc})") from None


_checked: set[str] = set()


def check_grammar(vocab: object, grammar: str) -> None:
    """Raise InferenceError unless llama.cpp parses ``grammar`` (each text once)."""
    if grammar in _checked:
        return
    smpl = L.llama_sampler_init_grammar(vocab, grammar.encode(), ROOT.encode())
    if not smpl:
        raise InferenceError("response_format: llama.cpp rejected the grammar")
    L.llama_sampler_free(smpl)
    _checked.add(grammar)

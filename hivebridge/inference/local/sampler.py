"""Per-sequence sampling, incremental detokenizing and stop-string holdback."""

from __future__ import annotations

import codecs
import ctypes
import random
from dataclasses import dataclass

import llama_cpp as L


@dataclass(frozen=True, slots=True)
class ResolvedSampling:
    """SamplingParams with profile defaults filled in and limits applied."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    seed: int
    stop: tuple[str, ...]
    ignore_eos: bool = False
    grammar: str | None = None  # GBNF (root rule "root") the output must match
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias) added to the logits


class SamplerChain:
    """One llama_sampler chain per sequence: its penalty history is that sequence's own.

    Order follows llama.cpp's common sampler: penalties, top-k, top-p, min-p,
    temperature, dist (seeded). Temperature 0 means greedy (argmax after penalties).
    A grammar goes first: every token it rejects is out before anything is picked,
    so the output always matches it (and ends, with an end-of-generation token,
    only where the grammar does).
    """

    def __init__(
        self,
        s: ResolvedSampling,
        n_vocab: int,
        eog_tokens: tuple[int, ...],
        vocab: object | None = None,
    ) -> None:
        self._chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if self._chain is None:
            raise MemoryError("llama_sampler_chain_init failed")
        if s.grammar is not None and vocab is not None:
            grammar = L.llama_sampler_init_grammar(vocab, s.grammar.encode(), b"root")
            if not grammar:  # checked when the request came in; never expected here
                self.free()
                raise ValueError("llama.cpp rejected the grammar")
            self._add(grammar)
        bias = {t: b for t, b in s.logit_bias if 0 <= t < n_vocab}
        if s.ignore_eos:
            bias.update((tok, float("-inf")) for tok in eog_tokens)
        if bias:
            biases = (L.llama_logit_bias * len(bias))()
            for i, (tok, b) in enumerate(bias.items()):
                biases[i] = L.llama_logit_bias(tok, b)
            self._add(L.llama_sampler_init_logit_bias(n_vocab, len(bias), biases))
        if s.repeat_penalty != 1.0 and s.repeat_last_n != 0:
            self._add(
                L.llama_sampler_init_penalties(n_vocab, s.repeat_last_n, s.repeat_penalty, 0.0, 0.0)
            )
        if s.temperature <= 0.0:
            self._add(L.llama_sampler_init_greedy())
            return
        if s.top_k > 0:
            self._add(L.llama_sampler_init_top_k(s.top_k))
        if 0.0 < s.top_p < 1.0:
            self._add(L.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0.0:
            self._add(L.llama_sampler_init_min_p(s.min_p, 1))
        self._add(L.llama_sampler_init_temp(s.temperature))
        self._add(L.llama_sampler_init_dist(s.seed & 0xFFFFFFFF))

    def _add(self, smpl: object) -> None:
        L.llama_sampler_chain_add(self._chain, smpl)

    def sample(self, ctx: object, row: int) -> int:
        """Sample from batch row ``row`` (the chain accepts the token itself)."""
        return int(L.llama_sampler_sample(self._chain, ctx, row))

    def free(self) -> None:
        if self._chain is not None:
            L.llama_sampler_free(self._chain)
            self._chain = None


def random_seed() -> int:
    return random.getrandbits(32) & 0x7FFFFFFF


class Detokenizer:
    """Token ids to text, holding back UTF-8 sequences split across tokens."""

    def __init__(self, vocab: object) -> None:
        self._vocab = vocab
        self._buf = ctypes.create_string_buffer(128)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, token: int) -> bytes:
        n = L.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, False)
        if n < 0:
            self._buf = ctypes.create_string_buffer(-n + 1)
            n = L.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, False)
        return self._buf.raw[: max(n, 0)]

    def feed(self, token: int) -> str:
        return self._decoder.decode(self.piece(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Cuts the stream at the first stop string without ever emitting part of one.

    Text that could be the start of a stop string is held back until the next
    token proves it is not.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, stopped)."""
        if not self._stops:
            return text, False
        buf = self._held + text
        cut = -1
        for s in self._stops:
            i = buf.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out

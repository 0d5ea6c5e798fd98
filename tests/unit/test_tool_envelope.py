"""The reply envelope: its schema and grammar, the prompt it adds, reading it back."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hivebridge.inference.envelope import (
    ENVELOPE_OVERHEAD_TOKENS,
    EnvelopeError,
    EnvelopeStream,
    envelope_messages,
    envelope_request,
    envelope_schema,
    parse_envelope,
    render_call,
    render_response,
    tool_instructions,
)
from hivebridge.inference.local.grammar import grammar_for_schema
from hivebridge.inference.types import (
    ChatMessage,
    InferenceError,
    SamplingParams,
    ToolCall,
    ToolSpec,
)

WEATHER = ToolSpec(
    "get_weather",
    "The weather at a place.",
    {
        "type": "object",
        "properties": {"location": {"type": "string", "maxLength": 20, "examples": ["Paris"]}},
        "required": ["location"],
        "additionalProperties": False,
    },
)
DICE = ToolSpec(
    "roll_dice",
    "Roll dice.",
    {
        "type": "object",
        "properties": {"count": {"type": "integer"}, "sides": {"type": "integer"}},
        "required": ["count", "sides"],
    },
)
TOOLS = (WEATHER, DICE)


def feed_all(text: str, step: int = 1) -> tuple[str, EnvelopeStream]:
    reader = EnvelopeStream()
    shown = "".join(reader.feed(text[i : i + step]) for i in range(0, len(text), step))
    return shown, reader


# --- schema -> grammar -------------------------------------------------------------------


def test_schema_offers_a_response_and_one_call_per_tool() -> None:
    schema = envelope_schema(TOOLS)
    kinds = [alt["properties"]["type"]["const"] for alt in schema["oneOf"]]
    assert kinds == ["response", "tool_call", "tool_call"]
    names = [alt["properties"]["name"]["const"] for alt in schema["oneOf"][1:]]
    assert names == ["get_weather", "roll_dice"]
    assert schema["oneOf"][1]["properties"]["arguments"] == WEATHER.parameters


def test_choice_narrows_the_schema() -> None:
    assert envelope_schema(TOOLS, "none")["properties"]["type"]["const"] == "response"
    required = envelope_schema(TOOLS, "required")["oneOf"]
    assert {a["properties"]["type"]["const"] for a in required} == {"tool_call"}
    named = envelope_schema(TOOLS, "roll_dice")
    assert named["properties"]["name"]["const"] == "roll_dice"
    with pytest.raises(InferenceError):
        envelope_schema(TOOLS, "send_mail")


def test_grammar_keeps_the_type_first_and_constrains_arguments() -> None:
    gbnf = grammar_for_schema(json.dumps(envelope_schema(TOOLS)))
    rules = dict(line.split(" ::= ", 1) for line in gbnf.splitlines())
    assert rules["root"] == "alternative-0 | alternative-1 | alternative-2"
    # Properties in the schema's order: "type" before "text", so text streams at once.
    assert rules["alternative-0"].index("type-kv") < rules["alternative-0"].index("text-kv")
    assert '"\\"get_weather\\""' in rules["alternative-1-name"]
    assert "location" in rules["alternative-1-arguments"]
    assert "integer" in rules["alternative-2-arguments-count-kv"]


def test_grammar_of_a_forced_call_has_no_response() -> None:
    gbnf = grammar_for_schema(json.dumps(envelope_schema(TOOLS, "get_weather")))
    assert "response" not in gbnf and "get_weather" in gbnf


def test_a_schema_the_converter_cannot_express_is_an_inference_error() -> None:
    with pytest.raises(InferenceError):
        grammar_for_schema(json.dumps({"type": "nonsense"}))


# --- the prompt --------------------------------------------------------------------------


def test_instructions_depend_on_the_tools_only() -> None:
    text = tool_instructions(TOOLS)
    assert text == tool_instructions(list(TOOLS))  # stable: the pinned prefix stays warm
    example = '{"type": "tool_call", "name": "get_weather", "arguments": {"location": "Paris"}}'
    assert example in text
    assert "- roll_dice: Roll dice." in text and "<" not in text  # examples, no placeholders
    a, _ = envelope_request([ChatMessage("system", "S")], SamplingParams(tools=TOOLS))
    b, _ = envelope_request(
        [ChatMessage("system", "S")], SamplingParams(tools=TOOLS, tool_choice="none")
    )
    assert a[0] == b[0]


def test_envelope_messages_write_calls_and_results_as_the_model_does() -> None:
    call = ToolCall("c1", "get_weather", {"location": "Oslo"})
    msgs = envelope_messages(
        [
            ChatMessage("system", "You are Ada."),
            ChatMessage("user", "Weather in Oslo?"),
            ChatMessage("assistant", "", tool_calls=(call,)),
            ChatMessage("tool", "Oslo: -3°C", tool_call_id="c1", name="get_weather"),
            ChatMessage("assistant", "It is -3°C."),
        ],
        TOOLS,
    )
    assert msgs[0].content.startswith("You are Ada.\n\nYou can use tools.")
    assert msgs[2] == ChatMessage("assistant", render_call(call))
    assert msgs[3] == ChatMessage("user", "Tool result (get_weather): Oslo: -3°C")
    assert msgs[4] == ChatMessage("assistant", render_response("It is -3°C."))
    assert all(not m.tool_calls for m in msgs)


def test_envelope_request_is_a_plain_text_request_with_a_schema() -> None:
    params = SamplingParams(max_tokens=100, tools=TOOLS, tool_choice="get_weather")
    _, inner = envelope_request([ChatMessage("user", "hi")], params)
    assert inner.tools == () and inner.tool_choice == "auto"
    assert inner.max_tokens == 100 + ENVELOPE_OVERHEAD_TOKENS
    assert inner.response_format is not None
    assert inner.response_format.schema == envelope_schema(TOOLS, "get_weather")


# --- reading it back ---------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_only_the_response_text_streams(step: int) -> None:
    raw = '{ "type": "response", "text": "Caf\\u00e9 \\ud83d\\ude00 \\"hi\\"\\nbye" }'
    shown, reader = feed_all(raw, step)
    assert shown == 'Café 😀 "hi"\nbye'
    env, rest = reader.finish(TOOLS)
    assert env.kind == "response" and env.text == shown and rest == ""


def test_a_tool_call_shows_nothing_and_parses() -> None:
    raw = (
        '{"type": "tool_call", "name": "get_weather", "arguments": {"location": "London", '
        '"text": "not the reply"}, "message": "Checking London"}'
    )
    shown, reader = feed_all(raw)
    env, rest = reader.finish(TOOLS)
    assert shown == "" and rest == ""
    assert env.call is not None and env.call.name == "get_weather"
    assert env.call.arguments == {"location": "London", "text": "not the reply"}
    assert env.note == "Checking London"


def test_text_before_the_type_waits_for_it() -> None:
    reader = EnvelopeStream()
    assert reader.feed('{"text": "Hello", "type": "resp') == ""
    assert reader.feed('onse"}') == "Hello"  # let through once it is a response
    env, rest = reader.finish(TOOLS)
    assert env.text == "Hello" and rest == ""


def test_a_response_cut_off_by_max_tokens_keeps_its_text() -> None:
    shown, reader = feed_all('{"type": "response", "text": "The weather in Lon')
    env, _ = reader.finish(TOOLS)
    assert shown == "The weather in Lon" and env.truncated and env.text == shown


@pytest.mark.parametrize(
    "raw",
    [
        "The weather is nice.",
        '{"type": "tool_call", "name": "get_weather", "arguments": {"loc',
        '{"type": "tool_call", "name": "send_mail", "arguments": {}}',
        '{"type": "tool_call", "name": "get_weather", "arguments": "London"}',
        '{"type": "poem", "text": "x"}',
        "[1, 2]",
    ],
)
def test_what_is_no_envelope_raises(raw: str) -> None:
    _, reader = feed_all(raw)
    with pytest.raises(EnvelopeError):
        reader.finish(TOOLS)


def test_raw_control_characters_in_strings_parse() -> None:
    """llama.cpp's JSON grammar lets a raw newline into a string; it must not fail."""
    env = parse_envelope('{"type": "response", "text": "a\nb"}', TOOLS)
    assert env.text == "a\nb"


@given(st.text(max_size=60))
def test_any_text_survives_the_round_trip(text: str) -> None:
    shown, reader = feed_all(render_response(text), 2)
    env, rest = reader.finish(TOOLS)
    assert shown + rest == text and env.text == text

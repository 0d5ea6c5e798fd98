"""Tool calls written as text, over real llama.cpp server outputs (tests/data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hivebridge.inference.tool_text import TextCallFilter, parse_text_tool_calls

DATA = json.loads(
    (Path(__file__).resolve().parents[1] / "data" / "tool_text_outputs.json").read_text()
)
OUTPUTS: list[dict[str, Any]] = DATA["outputs"]


def label(o: dict[str, Any]) -> str:
    return f"{o['server'][:16]}-{o['prompt'][:12]}-{o['seed']}"


def test_the_data_holds_calls_and_plain_answers() -> None:
    with_calls = [o for o in OUTPUTS if o["calls"]]
    assert len(with_calls) >= 30 and len(OUTPUTS) - len(with_calls) >= 30
    assert {o["server"] for o in OUTPUTS} >= {
        "llama_cpp.server 0.3.36",
        "llama-server (C++, b11434, no --jinja)",
    }


@pytest.mark.parametrize("output", OUTPUTS, ids=label)
def test_fallback_parser_over_real_server_outputs(output: dict[str, Any]) -> None:
    found = parse_text_tool_calls(output["content"], DATA["tools"])
    assert [{"name": c.name, "arguments": dict(c.arguments)} for c in found.calls] == output[
        "calls"
    ]
    if not found.calls:
        assert found.text == output["content"]


@pytest.mark.parametrize("output", OUTPUTS, ids=label)
def test_streaming_never_shows_a_calls_markup(output: dict[str, Any]) -> None:
    content = output["content"]
    flt = TextCallFilter()
    shown = "".join(flt.feed(content[i : i + 3]) for i in range(0, len(content), 3))
    rest, calls = flt.finish(DATA["tools"])
    assert [c.name for c in calls] == [c["name"] for c in output["calls"]]
    if calls:
        assert "get_weather" not in shown and "{" not in shown and "<tool_call>" not in shown
        assert rest == ""
    else:
        assert shown + rest == content  # no call: every word arrives, in order


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('{"name": "get_weather", "arguments": "{\\"location\\": \\"Rome\\"}"}', ["get_weather"]),
        (
            '{"tool_calls": [{"function": {"name": "get_weather", "arguments": {}}}]}',
            ["get_weather"],
        ),
        ('Sure! {"name": "get_weather", "arguments": {"location": "Rome"', ["get_weather"]),
    ],
)
def test_other_common_shapes(text: str, names: list[str]) -> None:
    found = parse_text_tool_calls(text, names)
    assert [c.name for c in found.calls] == names


def test_only_offered_tools_are_calls() -> None:
    text = '<tool_call>{"name": "delete_everything", "arguments": {}}</tool_call>'
    assert parse_text_tool_calls(text, ["get_weather"]).calls == ()
    assert parse_text_tool_calls('{"location": "Rome"}', ["get_weather"]).calls == ()


def test_call_ids_are_unique_within_a_reply() -> None:
    text = '[TOOL_CALLS] [{"name": "a", "arguments": {}}, {"name": "a", "arguments": {"x": 1}}]'
    calls = parse_text_tool_calls(text, ["a"]).calls
    assert len(calls) == 2 and calls[0].id != calls[1].id

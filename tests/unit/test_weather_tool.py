"""get_weather against a fake weather service on 127.0.0.1 (wttr.in's format= kind)."""

from __future__ import annotations

import pytest

from hivebridge.devserver.process import free_port
from hivebridge.personas.tools import ToolContext, ToolError
from hivebridge.personas.tools.builtin import weather_tool
from tests.support.fake_weather import FIGURES, fake_weather

CTX = ToolContext("!r:hive.test", "ada", "@alice:hive.test", "$e")


async def test_the_service_gets_the_place_and_format() -> None:
    async with fake_weather() as service:
        tool = weather_tool(service.url, "%l: %t", 5.0)
        out = await tool.run({"location": "  New   York "}, CTX)
    assert out == f"New York: Partly cloudy, {FIGURES}"
    assert service.places == ["New York"] and service.formats == ["%l: %t"]


async def test_the_place_stays_one_path_segment() -> None:
    async with fake_weather() as service:
        tool = weather_tool(service.url, "%t", 5.0)
        await tool.run({"location": "Paris/../admin?x=1#y"}, CTX)
    assert service.places == ["Paris/../admin?x=1#y"]  # escaped: no other path, no query


async def test_vague_places_never_reach_the_service() -> None:
    async with fake_weather() as service:
        tool = weather_tool(service.url, "%t", 5.0)
        with pytest.raises(ToolError, match="specific place"):
            await tool.run({"location": "here"}, CTX)
    assert service.places == []


async def test_unknown_places_and_dead_services_are_errors() -> None:
    async with fake_weather(unknown=frozenset({"atlantis"})) as service:
        tool = weather_tool(service.url, "%t", 5.0)
        with pytest.raises(ToolError, match="does not know 'Atlantis'"):
            await tool.run({"location": "Atlantis"}, CTX)
    dead = weather_tool(f"http://127.0.0.1:{free_port()}", "%t", 2.0)
    with pytest.raises(ToolError, match="cannot be reached"):
        await dead.run({"location": "Oslo"}, CTX)

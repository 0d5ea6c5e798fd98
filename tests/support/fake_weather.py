"""A weather service of wttr.in's ``format=`` kind, on 127.0.0.1, for tests.

``GET /{place}?format=…`` answers one line of text with fixed figures, and
records every place asked for, so a test can say what the bridge sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

#: The figures every answer carries; a reply that holds them came from the service.
FIGURES = "+17°C, wind 23 km/h, humidity 64%"


@dataclass
class FakeWeather:
    url: str
    places: list[str] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)


@asynccontextmanager
async def fake_weather(*, unknown: frozenset[str] = frozenset()) -> AsyncIterator[FakeWeather]:
    """Serve until the block ends; ``unknown`` places answer 404 like wttr.in."""
    state = FakeWeather("")

    async def place(request: web.Request) -> web.Response:
        name = request.match_info["place"]
        state.places.append(name)
        state.formats.append(request.query.get("format", ""))
        if name.lower() in unknown:
            return web.Response(status=404, text="Unknown location; please try ~")
        return web.Response(text=f"{name}: Partly cloudy, {FIGURES}\n")

    app = web.Application()
    app.router.add_get("/{place}", place)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()

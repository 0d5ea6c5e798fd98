"""What plain users may see: names and health, never endpoint URLs and key tails,
who uses the bridge, or the rooms a persona is in (trusted users see all)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hivebridge.catalogue import ModelCatalogue
from hivebridge.commands.base import CommandContext, CommandTable
from hivebridge.commands.models import ModelCommands
from hivebridge.commands.personas import PersonaCommands
from hivebridge.commands.stats import StatsCommands
from hivebridge.config import Config, HomeserverConfig, LimitsConfig, SecurityConfig
from hivebridge.db import open_database
from hivebridge.db.catalogue import CatalogueStore
from hivebridge.db.endpoints import EndpointStore
from hivebridge.db.personas import Persona
from hivebridge.db.usage import RateLimitStore, UsageRecord, UsageStore
from hivebridge.inference.local import EngineSettings, LocalModels
from hivebridge.inference.router import InferenceRouter
from hivebridge.permissions import Role
from hivebridge.personas.limits import Limits
from hivebridge.security import EndpointPolicy
from hivebridge.utc import utc_day
from tests.support.fake_openai import FakeOpenAI

KEY = "sk-visibility-SECRET-5e6f"
SECRET_ROOM = "!private-dm-of-alice:hive.test"


@dataclass
class Room:
    replies: list[str] = field(default_factory=list)

    async def reply(self, text: str) -> None:
        self.replies.append(text)


async def run(table: CommandTable, room: Room, body: str, role: Role) -> str:
    ctx = CommandContext("!room:x", f"@{role}:x", role, "$ev", room.reply)
    assert await table.run(ctx, body)
    return room.replies[-1]


async def test_plain_users_see_names_and_health_only(sqlite_url: str) -> None:
    """Before: every user saw endpoint URLs and key tails, the top users, a persona's rooms."""
    db = await open_database(sqlite_url)
    local = LocalModels(lambda: [], EngineSettings())
    router = InferenceRouter()
    endpoint = FakeOpenAI(model="remote-m")
    await endpoint.start()
    try:
        await local.rescan()
        catalogue = ModelCatalogue(CatalogueStore(db), router, local)
        await catalogue.load()
        cfg = Config(
            homeserver=HomeserverConfig("http://127.0.0.1:1", "hive.test"),
            limits=LimitsConfig(requests_per_minute=0),
            security=SecurityConfig(private_endpoint_hosts=("127.0.0.1",)),
        )
        usage = UsageStore(db)
        limits = Limits(cfg.limits, usage, RateLimitStore(db), lambda m: "user")
        table = CommandTable()
        policy = EndpointPolicy(cfg.security, [])
        ModelCommands(cfg, catalogue, router, EndpointStore(db), limits, len, policy).register(
            table
        )
        StatsCommands(usage, "@bot:x").register(table)
        room = Room()
        added = await run(table, room, f"!add_endpoint gpu1 {endpoint.base_url} {KEY}", "owner")
        assert "remote-m" in added, added
        day = utc_day(0)
        await usage.record(
            UsageRecord(0, day, "@alice:hive.test", SECRET_ROOM, None, "remote-m", "reply", 3, 4)
        )

        full = await run(table, room, "!endpoints", "trusted")
        assert endpoint.base_url in full and "key set" in full
        assert KEY[-4:] not in full  # no part of a key, whoever asks
        plain = await run(table, room, "!endpoints", "user")
        assert "gpu1" in plain and "healthy" in plain and "remote-m" in plain
        assert str(endpoint.port) not in plain and KEY[-4:] not in plain and "key" not in plain

        assert "@alice:hive.test" in await run(table, room, "!stats", "owner")
        stats = await run(table, room, "!stats", "user")
        assert "@alice:hive.test" not in stats and "top users" not in stats
        assert "per model: remote-m" in stats

        persona = Persona("mira", "@hive_mira:hive.test", "Mira", "You are Mira.")
        commands = PersonaCommands(Directory(persona), lifecycle=None)  # type: ignore[arg-type]
        assert SECRET_ROOM in await commands.describe(persona, full=True)
        shown = await commands.describe(persona, full=False)
        assert SECRET_ROOM not in shown and "rooms: 1" in shown
        table2, room2 = CommandTable(), Room()
        commands.register(table2)
        assert SECRET_ROOM not in await run(table2, room2, "!persona show mira", "user")
        assert SECRET_ROOM in await run(table2, room2, "!persona show mira", "trusted")
    finally:
        await endpoint.stop()
        await router.aclose()
        await local.close()
        await db.stop()


class Directory:
    """The persona directory's read side, for one persona in one private room."""

    def __init__(self, persona: Persona) -> None:
        self.persona = persona
        self.config = Config(homeserver=HomeserverConfig("http://127.0.0.1:1", "hive.test"))
        self.store = self

    def get(self, mxid: str) -> Persona | None:
        return self.persona if mxid == self.persona.mxid else None

    async def rooms_of(self, name: str) -> list[str]:
        return [SECRET_ROOM]

"""What tools keep in the database, on real SQLite and PostgreSQL: persona tool
settings, calls stored with their reply, and the room search behind
room_history_search (only the asking room; LIKE's wildcards are plain text)."""

from __future__ import annotations

from hivebridge.db import open_database
from hivebridge.db.messages import MessageStore, StoredMessage
from hivebridge.db.personas import Persona, PersonaStore
from hivebridge.db.tool_calls import StoredToolCall, ToolCallStore
from hivebridge.personas.tools import ToolContext
from hivebridge.personas.tools.builtin import history_search_tool


def msg(
    event_id: str, body: str, room: str = "!a:x", sender: str = "@alice:x", ts: int = 1
) -> StoredMessage:
    return StoredMessage(event_id, room, sender, "m.text", body, {"body": body}, None, None, ts)


async def test_persona_tool_settings_round_trip(db_url: str) -> None:
    db = await open_database(db_url)
    try:
        store = PersonaStore(db)
        await store.insert(Persona("ada", "@hive_ada:x", "Ada", "p", tools=("get_weather",)))
        await store.insert(Persona("bob", "@hive_bob:x", "Bob", "p"))
        ada, bob = await store.get("ada"), await store.get("bob")
        assert ada is not None and ada.tools == ("get_weather",) and ada.tool_choice is None
        assert bob is not None and bob.tools is None  # the config's default
        from dataclasses import replace

        await store.update(replace(bob, tools=(), tool_choice="required"))
        bob = await store.get("bob")
        assert bob is not None and bob.tools == () and bob.tool_choice == "required"
    finally:
        await db.stop()


async def test_calls_belong_to_their_reply_once_it_is_out(db_url: str) -> None:
    db = await open_database(db_url)
    try:
        store = ToolCallStore(db)

        def row(hop: int, call_id: str) -> StoredToolCall:
            return StoredToolCall(
                "$q", "ada", "!a:x", hop, call_id, "get_weather", {"location": "Oslo"}, "",
                "Oslo: -3°C", "ok", 12, None, 0,
            )  # fmt: skip

        await store.add(row(0, "c1"))
        await store.add(row(1, "c2"))
        assert await store.for_replies("!a:x", ["$reply"]) == {}
        await store.forget_unfinished("$q", "ada")  # a resumed reply starts over
        assert await store.for_job("$q", "ada") == []
        await store.add(row(0, "c3"))
        await store.set_reply("$q", "ada", "$reply")
        found = await store.for_replies("!a:x", ["$reply", "$other"])
        assert [(c.call_id, c.arguments, c.result) for c in found["$reply"]] == [
            ("c3", {"location": "Oslo"}, "Oslo: -3°C")
        ]
        await store.forget_unfinished("$q", "ada")  # finished calls stay
        assert len(await store.for_job("$q", "ada")) == 1
    finally:
        await db.stop()


async def test_history_search_reads_the_asking_room_only(db_url: str) -> None:
    db = await open_database(db_url)
    try:
        messages = MessageStore(db)
        for m in [
            msg("$1", "Pizza on Friday?", ts=1),
            msg("$2", "I prefer PIZZA with olives", sender="@bob:x", ts=2),
            msg("$3", "pizza in the other room", room="!b:x", ts=3),
            msg("$4", "100% sure, my_file is here", ts=4),
            msg("$5", "1000 sure, myXfile", ts=5),
            msg("$6", "!tools", ts=6),
        ]:
            await messages.insert(m)
        tool = history_search_tool(messages)
        ctx = ToolContext("!a:x", "ada", "@alice:x", "$ask")
        out = await tool.run({"query": "pizza"}, ctx)
        assert "olives" in out and "Friday" in out and "other room" not in out
        assert out.index("olives") < out.index("Friday")  # newest first
        assert "olives" in await tool.run({"query": "pizza", "sender": "bob"}, ctx)
        assert "Friday" not in await tool.run({"query": "pizza", "sender": "bob"}, ctx)
        wild = await tool.run({"query": "100% my_file"}, ctx)
        assert "my_file" in wild and "myXfile" not in wild
        assert await tool.run({"query": "tools"}, ctx) == "no earlier message matches"
    finally:
        await db.stop()

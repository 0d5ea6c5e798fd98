"""Scenes on real SQLite and PostgreSQL: one active per room, turns bounded, endings kept."""

from __future__ import annotations

from hivebridge.db import open_database
from hivebridge.db.scenes import SceneStore


async def test_one_active_scene_per_room_and_its_turns(db_url: str) -> None:
    db = await open_database(db_url)
    try:
        store = SceneStore(db)
        scene = await store.create("!r:x", ("ada", "bob"), "round_robin", "tea", 3, "@u:x")
        assert scene is not None and scene.active and scene.personas == ("ada", "bob")
        assert await store.create("!r:x", ("cy", "dee"), "mention", "", 2, "@v:x") is None
        other = await store.create("!s:x", ("cy", "dee"), "mention", "", 2, "@v:x")
        assert other is not None
        assert {s.room_id for s in await store.all_active()} == {"!r:x", "!s:x"}

        await store.request(scene.id, "bob", "$asked")
        asked = await store.active("!r:x")
        assert asked is not None and (asked.requested, asked.requested_event) == ("bob", "$asked")
        for speaker in ("ada", "bob", "ada"):
            assert await store.take_turn(scene.id, speaker)
        assert not await store.take_turn(scene.id, "bob")  # the budget is the database's too
        now = await store.active("!r:x")
        assert now is not None and now.turns_taken == 3 and now.last_speaker == "ada"
        assert now.requested is None and now.requested_event is None  # answered

        assert await store.end(scene.id, "stopped", "@u:x")
        assert not await store.end(scene.id, "turns")  # ends once
        assert await store.active("!r:x") is None
        last = await store.latest("!r:x")
        assert last is not None and last.end_reason == "stopped" and last.stopped_by == "@u:x"
        assert last.ended_at is not None
        again = await store.create("!r:x", ("ada", "bob"), "round_robin", "", 2, "@u:x")
        assert again is not None and again.id != scene.id  # a new one once it ended
    finally:
        await db.stop()

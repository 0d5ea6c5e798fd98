"""Exactly once across a crash: kill -9 the bridge while replies are pending.

Real Synapse (the session's), real PostgreSQL, the bridge as a subprocess. A
human addresses the persona in group rooms (its replies are Matrix replies,
m.in_reply_to, and carry the answered event id); the bridge is killed by its
PID while a reply is half streamed; two more messages arrive while it is down
(Synapse queues them); the bridge restarts, resumes its reply jobs and
unhandled messages, pings Synapse for the queued ones, and every addressed
message ends with exactly one reply: none lost, none posted twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from hivebridge.app import Bridge
from hivebridge.devserver.client import HumanClient, shown_text
from tests.e2e.bridge_process import (
    BridgeProcess,
    answers_to,
    bridge_config_yaml,
    dump,
    pg_fetch,
    pg_value,
    room_history,
)
from tests.e2e.conftest import Homeserver

ROOMS = 3
BEFORE_CRASH = 5
WHILE_DOWN = 2


async def addressed(human: HumanClient, room: str, persona: str, text: str) -> str:
    """A message that addresses the persona by name and by m.mentions."""
    return await human.send_text(
        room, f"Assistant, {text}", **{"m.mentions": {"user_ids": [persona]}}
    )


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, poll: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(poll)


async def test_kill_9_while_replies_are_pending_answers_each_message_once(
    homeserver: Homeserver, postgres_url: str, tmp_path: Path
) -> None:
    config = homeserver.config
    persona = config.persona_mxid(config.default_persona.name)
    bot = config.bot_mxid
    # Longer replies, edited often: the kill lands in the middle of a stream.
    yaml = bridge_config_yaml(
        config, postgres_url, tmp_path / "data", max_tokens=48, edit_interval_s=0.1
    )
    bridge = BridgeProcess.write(tmp_path, yaml, homeserver.registration)
    started = time.monotonic()
    try:
        await bridge.start()
        async with await homeserver.human("crash") as human:
            rooms = []
            for i in range(ROOMS):
                room = await human.create_room([persona, bot], name=f"crash {i}")
                rooms.append(room)
            for room in rooms:
                await human.wait_for_members(room, {human.user_id, persona, bot})

            sent: dict[str, str] = {}  # event id -> room
            for i in range(BEFORE_CRASH):
                room = rooms[i % ROOMS]
                sent[await addressed(human, room, persona, f"question {i}: name a colour.")] = room

            # Kill the moment a reply is on screen but not finished (its job pending).
            async def mid_stream() -> bool:
                n = await pg_value(
                    postgres_url,
                    "SELECT COUNT(*) FROM reply_jobs "
                    "WHERE state='pending' AND reply_event_id IS NOT NULL",
                )
                return bool(n)

            await wait_until(mid_stream, 90, "no reply was ever streaming")
            bridge.kill9()
            killed_at = time.monotonic()

            jobs = await pg_fetch(postgres_url, "SELECT event_id, state FROM reply_jobs")
            pending = [j["event_id"] for j in jobs if j["state"] == "pending"]
            unhandled = await pg_value(
                postgres_url,
                "SELECT COUNT(*) FROM messages WHERE handled=false AND sender=$1",
                human.user_id,
            )
            assert pending, f"nothing was pending at the kill: {dump([dict(j) for j in jobs])}"
            print(
                f"\nkilled with {len(pending)} pending and "
                f"{sum(j['state'] == 'done' for j in jobs)} done reply jobs, "
                f"{unhandled} unhandled messages"
            )

            # Synapse takes these while the bridge is down and queues their delivery.
            for i in range(WHILE_DOWN):
                room = rooms[i % ROOMS]
                sent[await addressed(human, room, persona, f"late {i}: name a fruit.")] = room

            await bridge.start()
            print(f"restarted {time.monotonic() - killed_at:.1f}s after the kill")

            # Every addressed message answered and every job settled.
            async def all_done() -> bool:
                n = await pg_value(
                    postgres_url, "SELECT COUNT(*) FROM reply_jobs WHERE state='done'"
                )
                return int(n) >= len(sent)

            await wait_until(all_done, 120, "not every message was answered", poll=0.25)
            # Give a would-be duplicate (a second routing, a re-send) time to show up.
            await asyncio.sleep(3)

            histories = {room: await room_history(human, room) for room in rooms}
            replies: dict[str, str] = {}
            for event_id, room in sent.items():
                found = answers_to(histories[room], persona, event_id)
                assert len(found) == 1, (
                    f"{event_id}: {len(found)} replies\n{dump(histories[room][-30:])}"
                )
                reply = found[0]
                replies[event_id] = reply["event_id"]
                assert reply["content"].get("msgtype") == "m.text", reply  # no error notice
                assert shown_text(histories[room], reply["event_id"]).strip()

            rows = await pg_fetch(
                postgres_url, "SELECT event_id, state, reply_event_id FROM reply_jobs"
            )
            assert {r["event_id"]: (r["state"], r["reply_event_id"]) for r in rows} == {
                e: ("done", r) for e, r in replies.items()
            }
            # Every human message stored once and routed.
            stored = await pg_fetch(
                postgres_url,
                "SELECT event_id, handled FROM messages WHERE sender=$1",
                human.user_id,
            )
            assert sorted(r["event_id"] for r in stored) == sorted(sent)
            assert all(r["handled"] for r in stored)
        print(
            f"{len(sent)} addressed messages, {len(replies)} replies, each exactly once; "
            f"bridge starts {', '.join(f'{s:.1f}s' for s in bridge.starts)}; "
            f"test {time.monotonic() - started:.1f}s"
        )
    finally:
        bridge.stop()


async def test_resume_finds_a_reply_sent_just_before_the_crash(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    """The window the kill cannot aim at: the reply's send landed, then the crash came
    before the bridge wrote anything down (job without reply id, reply not stored).
    Synapse's txn cache would dedupe a re-send only while it runs and for 30-60 min;
    the resume finds the posted reply in the room instead and finishes it by an edit.
    Also: a pending job older than replies.resume_max_age_s is left alone, and a
    message that old (a late redelivery) is stored but not answered."""
    config = bridge.config
    persona = config.persona_mxid(config.default_persona.name)
    name = config.default_persona.name
    jobs, messages, db = bridge.parts.jobs, bridge.parts.messages, bridge.parts.db
    assert jobs is not None
    async with await homeserver.human("window") as human:
        room = await human.create_room([persona, config.bot_mxid], name="window")
        await human.wait_for_members(room, {human.user_id, persona, config.bot_mxid})
        asked = await addressed(human, room, persona, "what is two plus two?")

        async def answered() -> bool:
            job = await jobs.get(asked, name)
            return job is not None and job.state == "done"

        await wait_until(answered, 90, "no reply")
        await bridge.parts.handler.drain()
        job = await jobs.get(asked, name)
        assert job is not None and job.reply_event_id is not None
        reply_id = job.reply_event_id
        edits_before = sum(
            1
            for e in await room_history(human, room)
            if e.get("content", {}).get("m.relates_to", {}).get("event_id") == reply_id
        )

        # Back to the state right after the send: pending, no reply id, nothing stored.
        await db.execute(
            "UPDATE reply_jobs SET state='pending', reply_event_id=NULL WHERE event_id=$1", asked
        )
        await db.execute("DELETE FROM messages WHERE event_id=$1", reply_id)
        unfinished = await bridge.unfinished()
        assert [m.event_id for m in unfinished] == [asked]
        for msg in unfinished:
            bridge.parts.handler.resume(msg)
        await bridge.parts.handler.drain()

        job = await jobs.get(asked, name)
        assert job is not None and (job.state, job.reply_event_id) == ("done", reply_id)
        history = await room_history(human, room)
        assert [e["event_id"] for e in answers_to(history, persona, asked)] == [reply_id]
        edits = [
            e
            for e in history
            if e.get("content", {}).get("m.relates_to", {}).get("event_id") == reply_id
        ]
        assert len(edits) == edits_before + 1  # the resume's one final edit, no new message
        assert shown_text(history, reply_id).strip()

        # Too old to resume: stays stored as it is.
        max_age_ms = int(config.replies.resume_max_age_s * 1000)
        await db.execute(
            "UPDATE reply_jobs SET state='pending', created_at=$2 WHERE event_id=$1",
            asked,
            int(time.time() * 1000) - max_age_ms - 60_000,
        )
        assert asked not in [m.event_id for m in await bridge.unfinished()]
        await db.execute("UPDATE reply_jobs SET state='done' WHERE event_id=$1", asked)

        # A message older than the max age (as if redelivered late) is not answered.
        bridge.parts.handler.messages.config = replace(
            config, replies=replace(config.replies, resume_max_age_s=0.0)
        )
        late = await addressed(human, room, persona, "are you still there?")

        async def routed() -> bool:
            stored = await messages.get(late)
            return stored is not None and stored.handled

        await wait_until(routed, 30, "the late message was never routed")
        await bridge.parts.handler.drain()
        assert await jobs.for_event(late) == {}
        history = await room_history(human, room)
        assert answers_to(history, persona, late) == []

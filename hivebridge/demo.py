"""``hivebridge demo``: a private Synapse, the bridge, and a human who says hello.

Alice asks the default persona one question in a direct chat (end-to-end
encrypted with ``--encrypted``: her app encrypts, the persona decrypts and
answers encrypted); then, in a group room with the bot, she spawns a second
persona with ``!persona spawn`` and asks both at once, and both answer.
Everything runs on 127.0.0.1 in a temporary directory; everything started is
stopped again unless ``--keep`` is given. The transcripts go to stdout,
progress and what to look at next to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from .app import Bridge
from .devserver.client import Event, HumanClient, is_edit, shown_text
from .devserver.encrypting_client import EncryptingHuman
from .devserver.stack import SERVER_NAME, DevStack
from .logs import setup_logging
from .matrix.content import ANSWERS_KEY

#: The group room's alias, the persona alice spawns there and the command she types.
GROUP_ALIAS = f"#hive:{SERVER_NAME}"
SECOND = "poet"
SPAWN = (
    '!persona spawn poet --display Poet --prompt "You are a poet. Answer in two short lines." '
    f"--room {GROUP_ALIAS}"
)
GROUP_QUESTION = "Assistant and Poet, what do you like about the sea?"


async def run_demo(
    *, keep: bool = False, message: str, workdir: str | None = None, encrypted: bool = False
) -> int:
    """The demo until it ends, or until SIGTERM or SIGINT: then everything it started
    (the bridge, Synapse) is stopped by its own cleanup and the exit status is 0."""
    setup_logging("WARNING")
    loop = asyncio.get_running_loop()
    demo = asyncio.create_task(
        _demo(keep=keep, message=message, workdir=workdir, encrypted=encrypted)
    )
    signals = (signal.SIGTERM, signal.SIGINT)

    def stop() -> None:
        if not demo.cancelling():  # once: a second signal must not cut the cleanup
            demo.cancel()

    for sig in signals:
        loop.add_signal_handler(sig, stop)
    try:
        return await demo
    except asyncio.CancelledError:
        say("stopped; the bridge and Synapse are stopped too")
        return 0
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _demo(*, keep: bool, message: str, workdir: str | None, encrypted: bool) -> int:
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="hivebridge-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    stack = DevStack(root)
    config, synapse = stack.config, stack.synapse
    bridge = Bridge(config, stack.registration)
    try:
        say(f"starting Synapse on {synapse.url} ...")
        await stack.start()
        say("starting hivebridge ...")
        await bridge.start()
        persona_mxid = config.persona_mxid(config.default_persona.name)
        enc: EncryptingHuman | None = None
        if encrypted:
            enc = await EncryptingHuman.create(synapse.url, synapse.shared_secret, "alice")
            alice = enc.plain
        else:
            alice = await HumanClient.create(synapse.url, synapse.shared_secret, "alice")
        try:
            if enc is not None:
                room = await enc.create_room([persona_mxid], direct=True)
            else:
                room = await alice.create_room([persona_mxid], direct=True)
            await alice.wait_for_members(room, {alice.user_id, persona_mxid})
            kind = "an encrypted DM" if enc is not None else "a DM"
            say(f"alice opened {kind} with {persona_mxid}\n")
            print("--- transcript ---")
            print(f"<alice> {message}")
            started = time.monotonic()
            is_reply = lambda e: (  # noqa: E731
                e.get("sender") == persona_mxid
                and e.get("type") == "m.room.message"
                and not is_edit(e)
            )
            if enc is not None:
                asked = await enc.send_text(room, message)
                reply = await enc.wait_for(room, is_reply, timeout=120)
            else:
                asked = await alice.send_text(room, message)
                reply = await alice.wait_for(room, is_reply, timeout=120)
            first = time.monotonic() - started
            # The reply streams in as edits: print it as a client shows it once done.
            await _reply_done(bridge, asked, config.default_persona.name)
            if enc is not None:
                await enc.catch_up()
                timeline = enc.timeline.get(room, [])
            else:
                await alice.sync_once(timeout_ms=0)
                timeline = alice.timeline.get(room, [])
            done = time.monotonic() - started
            text = shown_text(timeline, reply["event_id"])
            print(f"<{config.default_persona.displayname}> {text}")
            print("--- end ---")
            how = "encrypted both ways, " if enc is not None else ""
            say(
                f"first text after {first:.2f}s, whole reply after {done:.2f}s, "
                f"{how}from the local model through Synapse\n"
            )
            group = await _group_room(bridge, alice)
            metrics_url = f"http://{config.metrics.hostname}:{config.metrics.port}/metrics"
            if keep:
                say(
                    f"\nkept running: homeserver {synapse.url} (server name {SERVER_NAME})\n"
                    f"log in as alice / hunter2-hive with Element (custom homeserver): "
                    f"the direct chat is {room}, the group room {GROUP_ALIAS} ({group})\n"
                    f"metrics: {metrics_url}\nCtrl-C (or SIGTERM) stops everything."
                )
                await asyncio.Event().wait()  # until a signal cancels the demo
            else:
                say(
                    "\nwhere to look next:\n"
                    "  make demo DEMO_ARGS=--keep  keeps it all running: talk to the personas "
                    "from Element (log in as alice / hunter2-hive)\n"
                    f"  {metrics_url}  this run's metrics, while it runs (with --keep)\n"
                    "  !help in a room, docs/commands.md  every command; docs/operations.md  "
                    "reload, the admin CLI, metrics"
                )
        finally:
            await (enc or alice).close()
        return 0
    except Exception as e:
        logging.getLogger("hivebridge.demo").debug("demo failed", exc_info=True)
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        try:
            await bridge.stop()
        finally:
            stack.stop()
        if not workdir and not keep:
            shutil.rmtree(root, ignore_errors=True)


async def _group_room(bridge: Bridge, alice: HumanClient) -> str:
    """A group room: alice spawns a second persona with a command, then asks both."""
    config = bridge.config
    bot, assistant = config.bot_mxid, config.persona_mxid(config.default_persona.name)
    poet = config.persona_mxid(SECOND)
    room = await alice.create_room([bot, assistant], name="The hive", alias="hive")
    await alice.wait_for_members(room, {alice.user_id, bot, assistant})
    say(f"alice opened a group room, {GROUP_ALIAS}, with the bot and {assistant}\n")
    print("--- group room ---")
    print(f"<alice> {SPAWN}")
    await alice.send_text(room, SPAWN)
    spawned = await alice.wait_for(
        room, lambda e: e.get("sender") == bot and "Spawned" in _body(e), timeout=60
    )
    print(f"<{config.appservice.bot_displayname}> {_body(spawned)}")
    await alice.wait_for_members(room, {poet})
    print(f"<alice> {GROUP_QUESTION}")
    started = time.monotonic()
    asked = await alice.send_text(
        room, GROUP_QUESTION, **{"m.mentions": {"user_ids": [assistant, poet]}}
    )
    names = {assistant: config.default_persona.displayname, poet: "Poet"}
    replies = {}
    for mxid in names:
        replies[mxid] = await alice.wait_for(room, _answer(mxid, asked), timeout=120)
    for persona in (config.default_persona.name, SECOND):
        await _reply_done(bridge, asked, persona)
    await alice.sync_once(timeout_ms=0)
    for mxid, reply in sorted(replies.items(), key=lambda r: int(r[1]["origin_server_ts"])):
        print(f"<{names[mxid]}> {shown_text(alice.timeline.get(room, []), reply['event_id'])}")
    print("--- end ---")
    say(f"both answered in {time.monotonic() - started:.2f}s")
    return room


def _body(event: Event) -> str:
    return str(event.get("content", {}).get("body", ""))


def _answer(sender: str, asked: str):  # type: ignore[no-untyped-def]
    """Matches ``sender``'s reply to ``asked`` (its first message, not an edit)."""
    return lambda e: (
        e.get("sender") == sender
        and e.get("type") == "m.room.message"
        and not is_edit(e)
        and e.get("content", {}).get(ANSWERS_KEY) == asked
    )


def say(text: str) -> None:
    """Progress goes to stderr; the transcript alone goes to stdout."""
    print(text, file=sys.stderr, flush=True)


async def _reply_done(bridge: Bridge, event_id: str, persona: str, timeout: float = 120) -> None:
    """Wait until the persona's reply job for ``event_id`` is settled (final edit sent)."""
    jobs = bridge.parts.jobs
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = await jobs.get(event_id, persona)
        if job is not None and job.state != "pending":
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the reply to {event_id} did not finish in {timeout:.0f}s")

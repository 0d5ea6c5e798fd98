"""``hivebridge demo``: a private Synapse, the bridge, and a human who says hello.

Everything runs on 127.0.0.1 in a temporary directory; everything started is
stopped again unless ``--keep`` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .app import Bridge
from .devserver.client import HumanClient, is_edit, shown_text
from .devserver.stack import SERVER_NAME, DevStack
from .logs import setup_logging


async def run_demo(*, keep: bool = False, message: str, workdir: str | None = None) -> int:
    setup_logging("WARNING")
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
        async with await HumanClient.create(synapse.url, synapse.shared_secret, "alice") as alice:
            room = await alice.create_room([persona_mxid], direct=True)
            await alice.wait_for_members(room, {alice.user_id, persona_mxid})
            say(f"alice opened a DM with {persona_mxid}\n")
            print("--- transcript ---")
            print(f"<alice> {message}")
            started = time.monotonic()
            asked = await alice.send_text(room, message)
            reply = await alice.wait_for(
                room,
                lambda e: (
                    e.get("sender") == persona_mxid
                    and e.get("type") == "m.room.message"
                    and not is_edit(e)
                ),
                timeout=120,
            )
            first = time.monotonic() - started
            # The reply streams in as edits: print it as a client shows it once done.
            await _reply_done(bridge, asked, config.default_persona.name)
            await alice.sync_once(timeout_ms=0)
            done = time.monotonic() - started
            text = shown_text(alice.timeline.get(room, []), reply["event_id"])
            print(f"<{config.default_persona.displayname}> {text}")
            print("--- end ---")
            say(
                f"first text after {first:.2f}s, whole reply after {done:.2f}s, "
                "from the local model through Synapse"
            )
            if keep:
                say(
                    f"\nkept running: homeserver {synapse.url} (server name {SERVER_NAME})\n"
                    f"log in as alice / hunter2-hive with Element (custom homeserver), "
                    f"room {room}\nCtrl-C stops everything."
                )
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()
        return 0
    except Exception as e:
        logging.getLogger("hivebridge.demo").debug("demo failed", exc_info=True)
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        await bridge.stop()
        stack.stop()
        if not workdir and not keep:
            shutil.rmtree(root, ignore_errors=True)


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
